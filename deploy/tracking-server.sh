#!/usr/bin/env bash
# An MLflow tracking server for a team: PostgreSQL as the backend store, artifacts served
# by the tracking server from a local folder, optionally MLflow's basic-auth app in front.
#
#   deploy/tracking-server.sh start [--auth]   create (first time) and start PostgreSQL and `mlflow server`
#   deploy/tracking-server.sh stop             stop both
#   deploy/tracking-server.sh status           say what runs (exit 0 only when both do)
#   deploy/tracking-server.sh env              the export lines that point a shell at the server
#   deploy/tracking-server.sh psql [args]      psql on MLflow's database, as MLflow's database user
#
# Everything lives in $TRACKING_SERVER_DIR (default .tracking-server/ in the project):
#   db/         the PostgreSQL cluster (data/), its log and its socket; owned by the database's OS user
#   artifacts/  the served artifacts (experiments get `mlflow-artifacts:/` locations)
#   secrets/    generated passwords, the libpq password file and the auth config (mode 600)
#   mlflow.log, mlflow.pid, env
# Settings (environment): TRACKING_SERVER_HOST (127.0.0.1), TRACKING_SERVER_PORT (5000),
# TRACKING_DB_PORT (5433), TRACKING_DEFAULT_PERMISSION (READ: what a signed-in user may do where
# nobody granted more), PG_BINDIR (found), PYTHON (python; needs the project's `server` extra), and
# MLflow's own: MLFLOW_WORKERS (4), MLFLOW_SERVER_ALLOWED_HOSTS, MLFLOW_SERVER_ENABLE_JOB_EXECUTION
# (false skips the GenAI job runners), ... PostgreSQL refuses to run as root; run as root, the
# script runs it as TRACKING_DB_OS_USER (postgres, which Debian's package creates).
set -euo pipefail

STATE=$(realpath -m "${TRACKING_SERVER_DIR:-$(dirname "$0")/../.tracking-server}")
HOST=${TRACKING_SERVER_HOST:-127.0.0.1}
PORT=${TRACKING_SERVER_PORT:-5000}
DB_PORT=${TRACKING_DB_PORT:-5433}
DB_OS_USER=${TRACKING_DB_OS_USER:-postgres}
PYTHON=${PYTHON:-python}
DB_DIR=$STATE/db
SECRETS=$STATE/secrets
DB_NAME=mlflow
DB_USER=mlflow
AUTH_DB_NAME=mlflow_auth
ADMIN="admin"

die() { echo "tracking-server: $*" >&2; exit 1; }
say() { echo "tracking-server: $*" >&2; }

pg_bindir() {
  if [ -n "${PG_BINDIR:-}" ]; then echo "$PG_BINDIR"; return; fi
  if command -v pg_ctl >/dev/null; then dirname "$(readlink -f "$(command -v pg_ctl)")"; return; fi
  # Debian keeps the server binaries out of PATH.
  find /usr/lib/postgresql -path '*/bin/pg_ctl' 2>/dev/null | sort -V | tail -n 1 | xargs -r dirname
}
PG=$(pg_bindir)

# Run a PostgreSQL command as the owner of the cluster.
as_db_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$DB_OS_USER" -- "$@"; else "$@"; fi
}

new_secret() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }

write_secret() {  # file content: a file only its owner reads
  (umask 077 && printf '%s\n' "$2" >"$SECRETS/$1")
}

superuser_sql() {  # SQL on stdin, as the cluster's superuser over the socket (peer authentication)
  as_db_owner "$PG/psql" -q -X -v ON_ERROR_STOP=1 -h "$DB_DIR" -p "$DB_PORT" -d postgres >/dev/null
}

# The postmaster's pid when it runs. Read by the invoking user and signalled directly (not through
# pg_ctl as the cluster's owner), so status and stop work even where that owner can no longer reach
# the state folder.
postmaster_pid() {
  local pid
  pid=$(head -n 1 "$DB_DIR/data/postmaster.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

mlflow_pid() {  # the server's pid when it runs
  local pid
  pid=$(cat "$STATE/mlflow.pid" 2>/dev/null) || return 1
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

init_cluster() {
  [ -x "$PG/initdb" ] || die "PostgreSQL's server binaries were not found; install Debian's postgresql package or set PG_BINDIR"
  mkdir -p "$STATE"
  if [ "$(id -u)" = 0 ]; then
    id "$DB_OS_USER" >/dev/null 2>&1 || die "PostgreSQL refuses to run as root and user $DB_OS_USER does not exist; set TRACKING_DB_OS_USER"
    runuser -u "$DB_OS_USER" -- test -x "$STATE" ||
      die "user $DB_OS_USER cannot reach $STATE (a parent folder is private); pick another TRACKING_SERVER_DIR"
  fi
  say "creating a PostgreSQL cluster in $DB_DIR"
  mkdir "$DB_DIR" "$STATE/artifacts"
  (umask 077 && mkdir -p "$SECRETS")
  [ "$(id -u)" = 0 ] && chown "$DB_OS_USER:" "$DB_DIR"
  chmod 700 "$DB_DIR"
  as_db_owner "$PG/initdb" -D "$DB_DIR/data" --auth-local=peer --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C >"$STATE/initdb.log"
  # Loopback only; the socket stays in the state folder, not in /var/run/postgresql.
  printf "listen_addresses = '127.0.0.1'\nunix_socket_directories = '%s'\n" "$DB_DIR" \
    | as_db_owner tee -a "$DB_DIR/data/postgresql.conf" >/dev/null
  start_postgres
  local password
  password=$(new_secret)
  write_secret db-password "$password"
  # The password goes to psql on stdin, never on a command line.
  superuser_sql <<SQL
CREATE ROLE $DB_USER LOGIN PASSWORD '$password';
CREATE DATABASE $DB_NAME OWNER $DB_USER;
CREATE DATABASE $AUTH_DB_NAME OWNER $DB_USER;
SQL
  # libpq reads the password from here, so it is in no URI or command line either.
  write_secret pgpass "127.0.0.1:*:*:$DB_USER:$password"
  write_secret admin-password "$(new_secret)"
  write_secret flask-secret-key "$(new_secret)"
  touch "$STATE/.initialised"
}

start_postgres() {
  postmaster_pid >/dev/null && return
  as_db_owner "$PG/pg_ctl" -D "$DB_DIR/data" -l "$DB_DIR/postgres.log" -o "-p $DB_PORT" -w -t 60 start >/dev/null ||
    die "PostgreSQL did not start; see $DB_DIR/postgres.log"
  say "PostgreSQL listens on 127.0.0.1:$DB_PORT"
}

start_mlflow() {
  local auth=$1 url="http://$HOST:$PORT" app=()
  [ "$HOST" = 0.0.0.0 ] && url="http://$(hostname):$PORT"
  if [ "$auth" = 1 ]; then
    app=(--app-name basic-auth)
    # Users, permissions and the admin (created on the first start) live in PostgreSQL too.
    write_secret auth.ini "[mlflow]
default_permission = ${TRACKING_DEFAULT_PERMISSION:-READ}
database_uri = postgresql://$DB_USER@127.0.0.1:$DB_PORT/$AUTH_DB_NAME
admin_username = $ADMIN
admin_password = $(cat "$SECRETS/admin-password")"
    export MLFLOW_AUTH_CONFIG_PATH=$SECRETS/auth.ini
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$SECRETS/flask-secret-key")
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  export PGPASSFILE=$SECRETS/pgpass
  # setsid: the server and its uvicorn workers form one process group, stopped together.
  setsid "$PYTHON" -m mlflow server "${app[@]}" \
    --backend-store-uri "postgresql://$DB_USER@127.0.0.1:$DB_PORT/$DB_NAME" \
    --serve-artifacts --artifacts-destination "$STATE/artifacts" \
    --host "$HOST" --port "$PORT" >"$STATE/mlflow.log" 2>&1 </dev/null &
  echo $! >"$STATE/mlflow.pid"
  local deadline=$((SECONDS + ${TRACKING_SERVER_TIMEOUT:-180}))
  until "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
    "http://127.0.0.1:$PORT/health" 2>/dev/null; do
    mlflow_pid >/dev/null || die "mlflow server exited; see $STATE/mlflow.log"
    [ $SECONDS -lt $deadline ] || { stop_mlflow; die "mlflow server did not answer in time; see $STATE/mlflow.log"; }
    sleep 1
  done
  {
    echo "export MLFLOW_TRACKING_URI=$url"
    if [ "$auth" = 1 ]; then
      echo "export MLFLOW_TRACKING_USERNAME=$ADMIN"
      echo "export MLFLOW_TRACKING_PASSWORD=$(cat "$SECRETS/admin-password")"
    fi
  } | (umask 077 && cat >"$STATE/env")
  say "mlflow server$([ "$auth" = 1 ] && echo ' (basic-auth)') answers at $url; point a shell at it with:"
  cat "$STATE/env"
}

stop_mlflow() {
  local pid
  pid=$(mlflow_pid) || { rm -f "$STATE/mlflow.pid"; return 0; }
  # Give the whole group (uvicorn workers, job runners) time to shut down cleanly.
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$STATE/mlflow.pid" "$STATE/env"
  say "mlflow server stopped"
}

start() {
  local auth=0
  case "${1:-}" in --auth) auth=1 ;; "") ;; *) die "unknown option $1 (start takes --auth)" ;; esac
  mlflow_pid >/dev/null && die "mlflow server already runs (pid $(mlflow_pid)); stop it first"
  if [ ! -e "$STATE/.initialised" ]; then
    [ -e "$DB_DIR" ] && die "$STATE holds an unfinished set-up; remove it and start again"
    init_cluster
  fi
  start_postgres
  start_mlflow "$auth"
}

stop() {
  stop_mlflow
  local pid
  pid=$(postmaster_pid) || return 0
  kill -INT "$pid"  # PostgreSQL's fast shutdown: roll back open transactions, checkpoint, exit
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  ! kill -0 "$pid" 2>/dev/null || die "PostgreSQL (pid $pid) did not stop; see $DB_DIR/postgres.log"
  say "PostgreSQL stopped"
}

status() {
  local ok=0
  if postmaster_pid >/dev/null; then say "PostgreSQL runs ($DB_DIR/data)"; else say "PostgreSQL is stopped"; ok=3; fi
  if mlflow_pid >/dev/null; then say "mlflow server runs (pid $(mlflow_pid)):"; cat "$STATE/env"; else say "mlflow server is stopped"; ok=3; fi
  return $ok
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) status ;;
  env) cat "$STATE/env" 2>/dev/null || die "mlflow server is not running" ;;
  psql) shift; PGPASSFILE=$SECRETS/pgpass exec "$PG/psql" -X -h 127.0.0.1 -p "$DB_PORT" -U "$DB_USER" -d "$DB_NAME" "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac
