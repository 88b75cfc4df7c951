"""A team's tracking server: PostgreSQL and `mlflow server`, started by deploy/tracking-server.sh.

Stages run against it as users run them (subprocesses with MLFLOW_TRACKING_URI and credentials);
the records are then read back through the server and straight from PostgreSQL. Every process
listens on loopback and all state lives under pytest's temporary folder. Needs PostgreSQL's server
binaries (Debian's `postgresql`, which `.ci/run` installs); skipped, with a note, where they are missing.
"""

import base64
import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import ROOT, free_port, make_tree
from mlflow.server import get_app_client

from pipeline import config, ingest, onehot, tune

SCRIPT = ROOT / "deploy" / "tracking-server.sh"
HAS_POSTGRES = bool(shutil.which("pg_ctl") or glob("/usr/lib/postgresql/*/bin/pg_ctl"))

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        not HAS_POSTGRES,
        reason="PostgreSQL's server binaries (pg_ctl, initdb) are missing; install Debian's postgresql",
    ),
]

EXPERIMENT = "team"
LEGACY_ADMIN_PASSWORD = "password1234"  # what MLflow's basic_auth.ini shipped until recently


@dataclass
class Server:
    """One state folder of the script, and the environment it was started with."""

    state: Path
    env: dict[str, str]

    def script(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=300
        )

    def exports(self) -> dict[str, str]:
        """The variables `env` tells a user to export."""
        lines = self.script("env").stdout.splitlines()
        return dict(line.removeprefix("export ").split("=", 1) for line in lines)

    @property
    def url(self) -> str:
        return self.exports()["MLFLOW_TRACKING_URI"]

    def sql(self, query: str) -> list[list[str]]:
        """Rows of a query on MLflow's database, as MLflow's database user sees it."""
        done = self.script("psql", "-At", "-F", "\t", "-c", query)
        assert done.returncode == 0, done.stderr
        return [line.split("\t") for line in done.stdout.splitlines()]


@contextlib.contextmanager
def state_folder():
    """A fresh folder for PostgreSQL and the server, outside pytest's private temporary root.

    As root, the script runs PostgreSQL as `postgres`, which must reach its data folder; pytest's
    temporary root is private to root (0700), so the folder lives directly under the system's
    temporary directory instead, and is removed at the end.
    """
    folder = Path(tempfile.mkdtemp(prefix="sign-digits-tracking-server-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def started(*options: str):
    """PostgreSQL and `mlflow server` on free loopback ports, stopped at the end even on failure."""
    with state_folder() as state:
        env = {
            **os.environ,
            "TRACKING_SERVER_DIR": str(state),
            "TRACKING_SERVER_PORT": str(free_port()),
            "TRACKING_DB_PORT": str(free_port()),
            "PYTHON": sys.executable,
            # One worker and no GenAI job runners: less load, and no scratch folders in /dev/shm.
            "MLFLOW_WORKERS": "1",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        server = Server(state, env)
        try:
            done = server.script("start", *options)
            if done.returncode != 0:
                log = state / "mlflow.log"
                pytest.fail(f"{done.stderr}\n{log.read_text()[-3000:] if log.exists() else ''}")
            yield server
        finally:
            stopped = server.script("stop")
            assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="module")
def server():
    with started() as running:
        yield running


@pytest.fixture(scope="module")
def auth_server():
    with started("--auth") as running:
        yield running


def user_env(url: str, work: Path, credentials: tuple[str, str] | None = None) -> dict[str, str]:
    """A user's shell pointed at the server: no local store, scratch files under `work`."""
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
        "SIGN_DIGITS_DATA_DIR": str(work / "input_dataset"),
        "TMPDIR": str(work / "tmp"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for name in (
        "MLFLOW_RUN_ID",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        env.pop(name, None)
    if credentials:
        env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = credentials
    return env


def run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def stage_command(stage: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"pipeline.{stage}", *args]


def status(url: str, path: str, credentials: tuple[str, str] | None = None, body: dict | None = None) -> int:
    """The HTTP status of one REST call (POST when there is a body)."""
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    if credentials:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def download(url: str, run, artifact_path: str, folder: Path) -> Path:
    """An artifact downloaded over HTTP from the server."""
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=artifact_path, dst_path=str(folder), tracking_uri=url
        )
    )


def test_stages_log_runs_to_postgresql_and_artifacts_through_the_server(server, tmp_path):
    work = tmp_path / "work"
    env = user_env(server.url, work)
    photos = make_tree(tmp_path / "photos")

    ingested = run(stage_command("ingest", "--source", str(photos)), env, work)
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    client = mlflow.MlflowClient(server.url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (ingest_run,) = client.search_runs([experiment.experiment_id])
    # `mlflow run`, as `main` starts each step, with the upstream run given by id.
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "onehot", "--env-manager", "local"]
    command += ["--experiment-name", EXPERIMENT, "-P", f"ingest_run_id={ingest_run.info.run_id}"]
    encoded = run(command, env, work)
    assert encoded.returncode == 0, encoded.stderr[-3000:]

    runs = {r.data.tags[config.STAGE_TAG]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"ingest", "onehot"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["ingest"].data.params["source"] == str(photos)
    assert runs["ingest"].data.metrics["num_images"] == 40
    assert runs["onehot"].data.tags[config.INGEST_RUN_TAG] == ingest_run.info.run_id
    # Artifacts go through the server: the experiment stores no local path, the files land in
    # the served folder, and they download over HTTP.
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    labels = onehot.load(download(server.url, runs["onehot"], config.ONEHOT_ARTIFACT, tmp_path / "onehot"))
    arrays = ingest.load(download(server.url, runs["ingest"], config.INGEST_ARTIFACT, tmp_path / "ingest"))
    for split in config.SPLITS:
        assert np.array_equal(labels[f"y_{split}"].argmax(axis=1), arrays[f"y_{split}"])
    served = server.state / "artifacts" / experiment.experiment_id / ingest_run.info.run_id / "artifacts"
    assert (served / config.INGEST_ARTIFACT / config.IMAGES_FILE).is_file()
    # The records are rows in PostgreSQL, and the users' working folder holds no store of its own.
    rows = dict(
        server.sql(f"SELECT run_uuid, status FROM runs WHERE experiment_id = {experiment.experiment_id}")
    )
    assert rows == {r.info.run_id: "FINISHED" for r in runs.values()}
    assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()


def test_a_distributed_search_logs_every_workers_trials_under_one_search_run(server, tmp_path):
    """`tune --workers 2`: a Keras Tuner chief and two workers, each a client of the server."""
    work = tmp_path / "work"
    env = {**user_env(server.url, work), config.TUNER_DIR_ENV: str(work / "tuner")}
    env["MLFLOW_EXPERIMENT_NAME"] = "team-search"
    photos = make_tree(tmp_path / "photos", per_class=3)
    for command in (
        stage_command("ingest", "--source", str(photos), "--image-size", "32"),
        stage_command("onehot"),
        stage_command(
            "tune",
            *("--workers", "2", "--oracle", "random", "--max-trials", "3"),
            *("--epochs-per-trial", "1", "--precision", "float32"),
        ),
    ):
        done = run(command, env, work)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    client = mlflow.MlflowClient(server.url)
    experiment = client.get_experiment_by_name("team-search")
    (search,) = client.search_runs([experiment.experiment_id], f"tags.`{config.STAGE_TAG}` = 'tune'")
    trials = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{search.info.run_id}'"
    )
    assert search.info.status == "FINISHED" and search.data.metrics["num_trials"] == 3
    assert sorted(r.data.tags[tune.TRIAL_ID_TAG] for r in trials) == ["0", "1", "2"]
    assert {r.info.status for r in trials} == {"FINISHED"}
    assert {r.data.tags[tune.TUNER_ID_TAG] for r in trials} <= {"tuner0", "tuner1"}
    rows = dict(
        server.sql(f"SELECT run_uuid, status FROM runs WHERE experiment_id = {experiment.experiment_id}")
    )
    assert {r.info.run_id for r in trials} | {search.info.run_id} <= set(rows)
    assert not (work / "mlflow.db").exists()


def test_the_script_reports_status_and_keeps_secrets_private(server):
    done = server.script("status")
    assert done.returncode == 0, done.stderr
    assert "PostgreSQL runs" in done.stderr and f"MLFLOW_TRACKING_URI={server.url}" in done.stdout
    assert server.url.startswith("http://127.0.0.1:")
    for secret in (server.state / "secrets").iterdir():
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    # The database password is in no command line: libpq reads it from the password file.
    password = (server.state / "secrets" / "db-password").read_text().strip()
    mlflow_pid = (server.state / "mlflow.pid").read_text().strip()
    assert password not in Path(f"/proc/{mlflow_pid}/cmdline").read_text()


def test_requests_without_valid_credentials_are_refused(auth_server, tmp_path):
    exports = auth_server.exports()
    url, admin = exports["MLFLOW_TRACKING_URI"], exports["MLFLOW_TRACKING_USERNAME"]
    password = exports["MLFLOW_TRACKING_PASSWORD"]
    search = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert status(url, search) == 401
    assert status(url, search, (admin, password + "x")) == 401
    assert status(url, search, ("nobody", password)) == 401
    assert password != LEGACY_ADMIN_PASSWORD and len(password) >= 12
    assert status(url, search, (admin, LEGACY_ADMIN_PASSWORD)) == 401
    assert status(url, search, (admin, password)) == 200
    assert status(url, "/health") == 200  # for load balancers; it says nothing about the data
    # A stage without credentials stops at once, with one line that says why.
    photos = make_tree(tmp_path / "photos")
    refused = run(stage_command("ingest", "--source", str(photos)), user_env(url, tmp_path / "w"), tmp_path)
    assert refused.returncode == 2
    assert "error code 401" in refused.stderr and "Traceback" not in refused.stderr


def test_read_permission_reads_an_experiment_but_cannot_log_to_it(auth_server, tmp_path, monkeypatch):
    exports = auth_server.exports()
    url = exports["MLFLOW_TRACKING_URI"]
    for name, value in exports.items():
        monkeypatch.setenv(name, value)  # the admin's shell
    users = get_app_client("basic-auth", tracking_uri=url)
    reader, writer = ("reader", "reader-password"), ("writer", "writer-password")
    for name, password in (reader, writer):
        users.create_user(name, password)
    experiment_id = mlflow.MlflowClient(url).create_experiment(EXPERIMENT)
    users.grant_user_permission(reader[0], "experiment", experiment_id, "READ")
    users.grant_user_permission(writer[0], "experiment", experiment_id, "EDIT")

    # A stage run by the writer logs its run and artifacts; the same stage run by the reader is refused.
    photos = make_tree(tmp_path / "photos")
    ingested = run(
        stage_command("ingest", "--source", str(photos)), user_env(url, tmp_path / "w", writer), tmp_path
    )
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    refused = run(
        stage_command("ingest", "--source", str(photos)), user_env(url, tmp_path / "r", reader), tmp_path
    )
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr and "Traceback" not in refused.stderr
    (logged,) = mlflow.MlflowClient(url).search_runs([experiment_id])
    assert logged.data.metrics["num_images"] == 40

    # Over plain REST: the reader reads the experiment and the writer's run, and may not write.
    api = "/api/2.0/mlflow"
    run_id = logged.info.run_id
    metric = {"run_id": run_id, "key": "by_reader", "value": 1.0, "timestamp": 0}
    assert status(url, f"{api}/experiments/get?experiment_id={experiment_id}", reader) == 200
    assert status(url, f"{api}/runs/get?run_id={run_id}", reader) == 200
    assert status(url, f"{api}/runs/create", reader, {"experiment_id": experiment_id}) == 403
    assert status(url, f"{api}/runs/log-metric", reader, metric) == 403
    assert status(url, f"{api}/runs/log-metric", writer, {**metric, "key": "by_writer"}) == 200
    assert set(mlflow.MlflowClient(url).get_run(run_id).data.metrics) >= {"by_writer"}
    assert "by_reader" not in mlflow.MlflowClient(url).get_run(run_id).data.metrics
