"""MLflow plumbing shared by the stages: runs, tags, upstream look-ups, artifacts."""

import contextlib
import logging
import os
import platform
import resource
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException

from pipeline import config
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent
_opened: set[str] = set()  # SQLite stores this process has created or checked under the lock


def configure() -> None:
    """Point MLflow at $MLFLOW_TRACKING_URI, or SQLite in the working directory.

    The first time a process uses a SQLite store it opens it under a file lock:
    MLflow builds the tables of a new database without one, and two stages
    starting at once on a new store fail ("duplicate column name: step").
    """
    uri = config.tracking_uri()
    mlflow.set_tracking_uri(uri)
    path = _sqlite_path(uri)
    if path is not None and uri not in _opened:
        with _exclusive(path.with_name(f"{path.name}-init.lock")):
            MlflowClient().search_experiments(max_results=1)  # creates or checks the tables
        _opened.add(uri)


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for other stores and in-memory SQLite)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix) :] in ("", ":memory:"):
        return None
    return Path(uri[len(prefix) :].split("?")[0]).resolve()


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock` (advisory; none where fcntl is missing, as on Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def code_version() -> dict[str, str]:
    """Tags naming the git commit of the pipeline's code and whether it had local edits."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=_PACKAGE_DIR, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {config.COMMIT_TAG: "unknown", config.DIRTY_TAG: "unknown"}
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return {config.COMMIT_TAG: commit, config.DIRTY_TAG: str(bool(dirty)).lower()}


def machine() -> dict[str, Any]:
    """The processor this process runs on (its name, cores and bfloat16 instructions) and how many
    threads TensorFlow runs each op on: $TF_NUM_INTRAOP_THREADS, else one per core it may use."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    bfloat16 = [isa for isa in ("amx_bf16", "avx512_bf16") if isa in flags]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = os.environ.get("TF_NUM_INTRAOP_THREADS", "").strip()
    return {
        "processor": processor_name(fields),
        "cores": os.cpu_count(),
        "bfloat16": "+".join(bfloat16) or "none",
        "threads": int(threads) if threads.isdigit() and int(threads) > 0 else usable,
    }


def processor_name(cpuinfo: Mapping[str, str]) -> str:
    """The model name in /proc/cpuinfo with its family and model numbers: a virtual machine's
    name ("Intel(R) Xeon(R) Processor") says nothing of the generation behind it."""
    name = cpuinfo.get("model name") or platform.processor() or platform.machine()
    numbers = [f"{key} {cpuinfo[key]}" for key in ("cpu family", "model") if cpuinfo.get(key)]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def machine_tags() -> dict[str, str]:
    """The tags naming the machine a run's figures come from (see `machine`)."""
    host = machine()
    return {
        config.PROCESSOR_TAG: host["processor"],
        config.BFLOAT16_TAG: host["bfloat16"],
        config.THREADS_TAG: str(host["threads"]),
    }


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], run_id: str | None = None) -> Iterator[Run]:
    """Open the MLflow run of one stage, tagged with the stage, the code version, the process and
    the machine; when it ends, the process's peak resident memory so far is logged as
    config.PEAK_RSS_METRIC.

    Under `mlflow run` this resumes the run MLflow created for the entry point;
    otherwise it continues `run_id` when given (an unfinished run of the same stage in
    the project's experiment), else starts a new run there. The run ends FAILED on an
    error and KILLED on Ctrl-C. Runs that a killed process left RUNNING are marked
    KILLED first (see `end_dead_runs`). Raises PipelineError when the tracking store
    refuses the run (e.g. a server that wants credentials, or a user without EDIT
    permission on the experiment).
    """
    configure()
    try:
        if os.environ.get("MLFLOW_RUN_ID"):
            run_id = None
        else:
            mlflow.set_experiment(config.experiment_name())
        run = mlflow.start_run(run_id=run_id or None)
    except MlflowException as error:
        # A tracking server with authentication says no here: no credentials, or no permission.
        raise PipelineError(
            f"{config.tracking_uri()} did not start the {stage} run: {error.message}"
        ) from None
    try:
        mlflow.set_tags(
            {config.STAGE_TAG: stage, **code_version(), config.PROCESS_TAG: process_id(), **machine_tags()}
        )
        end_dead_runs(run.info.experiment_id)
        log_new_params(run, params)
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        with contextlib.suppress(Exception):  # the error that ended the run is the one to report
            mlflow.log_metric(config.PEAK_RSS_METRIC, peak_rss_mib())
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    else:
        mlflow.log_metric(config.PEAK_RSS_METRIC, peak_rss_mib())
        mlflow.end_run()


def peak_rss_mib() -> float:
    """The most resident memory this process has held so far, in MiB.

    /proc's VmHWM where there is one: Linux carries `ru_maxrss` across exec, so a stage started
    from a process holding 2 GiB reported 2 GiB whatever it held itself."""
    peak = process_memory_mib("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if platform.system() == "Darwin" else peak / 1024  # bytes there, KiB here


def process_memory_mib(field: str) -> float | None:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM", ...) in MiB; None without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def process_id(pid: int | None = None) -> str:
    """host:pid:start time of a process (this one by default), unique on this machine over time.

    The start time (clock ticks since boot, from /proc) tells a reused pid from the
    original; it is 0 where /proc is missing.
    """
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or 0}"


def process_alive(process: str) -> bool:
    """Whether the process named by `process_id` still runs; True when that cannot be told
    (another host, a malformed tag), so that nothing alive is ever declared dead."""
    host, _, rest = process.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    now = _start_time(int(pid))
    if now is not None:
        return started in ("0", str(now))
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return not Path("/proc").is_dir()  # with /proc, a pid missing from it is gone


def _start_time(pid: int) -> int | None:
    """The start time of a running process in clock ticks, None when it is gone, a zombie,
    or /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):  # killed, waiting for its parent to collect it
        return None
    return int(fields[19])


def end_dead_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the experiment's RUNNING runs whose process (PROCESS_TAG) on this host is gone.

    A SIGKILL, the OOM killer or a power cut ends a process without ending its run; this
    is the next stage noticing. Runs of other hosts and runs without the tag are left
    alone. Returns the ids marked.
    """
    client = mlflow.MlflowClient()
    host = socket.gethostname().replace("'", "")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{config.PROCESS_TAG}` LIKE '{host}:%'",
        max_results=1000,
    )
    ended = []
    for run in runs:
        if not process_alive(run.data.tags[config.PROCESS_TAG]):
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            log.warning(
                "run %s (%s) was left RUNNING by a process that is gone: marked KILLED",
                run.info.run_id,
                run.data.tags.get(config.STAGE_TAG, "not a stage"),
            )
            ended.append(run.info.run_id)
    return ended


def log_new_params(run: Run, params: Mapping[str, Any]) -> None:
    """Log params that the run does not have yet.

    `mlflow run` already logged the entry point's params as typed on the command
    line ("0.15" vs ".15"); MLflow refuses to change a logged param.
    """
    logged = mlflow.get_run(run.info.run_id).data.params
    new = {key: value for key, value in params.items() if key not in logged}
    if new:
        mlflow.log_params({key: "" if value is None else value for key, value in new.items()})


def find_run(stage: str, run_id: str | None) -> Run:
    """The finished run of `stage` with this id, or the latest one when `run_id` is empty.

    Raises PipelineError when the id is unknown, belongs to another stage or did not
    finish, or when the experiment has no finished run of `stage`.
    """
    configure()
    if run_id:
        return _check_run(stage, run_id)
    experiment = _current_experiment_id()
    runs = mlflow.search_runs(
        experiment_ids=[experiment],
        filter_string=f"tags.`{config.STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if not runs:
        raise PipelineError(
            f"no finished {stage} run in experiment {experiment}; "
            f"run `mlflow run . -e {stage}` first or pass its run id"
        )
    return runs[0]


def _check_run(stage: str, run_id: str) -> Run:
    wanted = f"give the id of a finished {stage} run, or leave it empty for the latest"
    try:
        run = mlflow.get_run(run_id)
    except MlflowException:
        raise PipelineError(
            f"run id {run_id!r} does not exist in {config.tracking_uri()}; {wanted}"
        ) from None
    actual = run.data.tags.get(config.STAGE_TAG)
    if actual != stage:
        kind = f"of stage {actual!r}" if actual else "not a pipeline stage's run"
        raise PipelineError(f"run {run_id} is {kind}, not {stage!r}; {wanted}")
    if run.info.status != "FINISHED":
        raise PipelineError(f"{stage} run {run_id} is {run.info.status}, not FINISHED; re-run it or {wanted}")
    return run


def upstream_run(stage: str, run_id: str) -> Run:
    """`find_run` for a stage's `<stage>_run_id` option; the error names the option."""
    try:
        return find_run(stage, run_id)
    except PipelineError as error:
        raise PipelineError(f"{stage}_run_id: {error}") from None


def check_upstream(**run_ids: str) -> None:
    """Raise PipelineError unless every non-empty `<stage>_run_id` names a finished run of that stage.

    Stages call it before they open their own run, so a wrong id costs nothing and logs nothing.
    """
    for name, run_id in run_ids.items():
        if run_id:
            upstream_run(name.removesuffix("_run_id"), run_id)


def _current_experiment_id() -> str:
    active = mlflow.active_run()
    if active:
        return active.info.experiment_id
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    experiment = mlflow.get_experiment_by_name(config.experiment_name())
    if experiment is None:
        raise PipelineError(
            f"experiment {config.experiment_name()!r} does not exist in {config.tracking_uri()}; "
            "run the ingest stage first"
        )
    return experiment.experiment_id


def download(run: Run, artifact_path: str) -> Path:
    """Download one artifact (file or folder) of `run` into a fresh temporary folder."""
    target = tempfile.mkdtemp(prefix=f"{run.info.run_id[:8]}-")
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path=artifact_path, dst_path=target
            )
        )
    except (MlflowException, OSError) as error:
        raise PipelineError(
            f"run {run.info.run_id} has no readable artifact {artifact_path!r} ({error})"
        ) from None
