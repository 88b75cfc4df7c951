"""A stage as several cooperating processes: the roles, and the local launcher for loopback.

Keras Tuner's distributed mode and TensorFlow's MultiWorkerMirroredStrategy do the
distributing; this module only tells a process its role (from the environment
variables those engines read) and, for `tune --workers N` and
`train --strategy multiworker`, starts the processes on this machine with those
variables set, relays their output, and stops them all when one fails.

- Keras Tuner: KERASTUNER_TUNER_ID (`chief`, or a worker's id such as `tuner0`),
  KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT (where the chief serves its oracle).
- TensorFlow: TF_CONFIG, {"cluster": {"worker": ["host:port", ...]}, "task": {"type":
  "worker", "index": i}}; worker 0 is the chief, unless the cluster names a `chief` task.

On several machines the same processes are started by hand or by a scheduler with the
same variables (README, "Running it for a team").
"""

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import mlflow
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException

from pipeline import config
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.cluster")

LOOPBACK = "127.0.0.1"
TUNER_ID_ENV = "KERASTUNER_TUNER_ID"
ORACLE_IP_ENV = "KERASTUNER_ORACLE_IP"
ORACLE_PORT_ENV = "KERASTUNER_ORACLE_PORT"
TF_CONFIG_ENV = "TF_CONFIG"
CHIEF = "chief"
TAIL_LINES = 15


# Roles


def tuner_role() -> str | None:
    """This process's Keras Tuner id (`chief` or a worker's), or None outside distributed tuning.

    Follows Keras Tuner's own rule: distributed when KERASTUNER_ORACLE_IP is set,
    the chief when the id contains "chief". Raises PipelineError naming a missing variable.
    """
    if ORACLE_IP_ENV not in os.environ:
        return None
    for name in (ORACLE_PORT_ENV, TUNER_ID_ENV):
        if not os.environ.get(name):
            raise PipelineError(f"{ORACLE_IP_ENV} is set but {name} is not; set both, or neither")
    tuner_id = os.environ[TUNER_ID_ENV]
    return CHIEF if CHIEF in tuner_id else tuner_id


def tf_config() -> dict | None:
    """TF_CONFIG as a dict, None when unset; PipelineError when it cannot drive a worker."""
    text = os.environ.get(TF_CONFIG_ENV, "").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
        task, cluster = value["task"], value["cluster"]
        members = cluster[task["type"]]
        if not 0 <= int(task["index"]) < len(members):
            raise ValueError(f"task index {task['index']} is not in {task['type']} {members}")
    except (ValueError, KeyError, TypeError) as error:
        raise PipelineError(
            f'{TF_CONFIG_ENV} must look like {{"cluster": {{"worker": ["host:port", ...]}}, '
            f'"task": {{"type": "worker", "index": 0}}}} ({error!r})'
        ) from None
    return value


def is_chief() -> bool:
    """Whether this process logs for its cluster: worker 0 (or the `chief` task), or no cluster."""
    value = tf_config()
    if value is None:
        return True
    task = value["task"]
    if CHIEF in value["cluster"]:
        return task["type"] == CHIEF
    return task["type"] == "worker" and int(task["index"]) == 0


def tf_config_for(workers: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


# Local launcher


class Process:
    """One member of a local cluster: its command, its environment, its log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path):
        self.name, self.argv, self.env = name, argv, dict(env)
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen | None = None
        self.starts = 0
        self._relay: threading.Thread | None = None

    def start(self) -> None:
        self.starts += 1
        with open(self.log_path, "a") as out:
            out.write(f"--- start {self.starts}: {' '.join(self.argv)}\n")
        self.popen = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self._relay = threading.Thread(target=self._copy, args=(self.popen.stdout,), daemon=True)
        self._relay.start()

    def _copy(self, stream) -> None:
        """Each line to the log file and, prefixed with the member's name, to our stderr."""
        with open(self.log_path, "a") as out:
            for line in stream:
                out.write(line)
                out.flush()
                sys.stderr.write(f"[{self.name}] {line}")

    def poll(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def wait(self, timeout: float) -> int | None:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._relay.join(timeout=5)
        return code

    def stop(self) -> None:
        """Terminate, then kill after 10 s; a process that already ended is left alone."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        if self.wait(10) is None:
            self.popen.kill()
            self.wait(10)

    def tail(self) -> str:
        """The last lines of the log; all of them once the process has ended."""
        if self.poll() is not None and self._relay:
            self._relay.join(timeout=5)
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-TAIL_LINES:])


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: Process, timeout: float = config.CLUSTER_START_TIMEOUT_S) -> None:
    """Block until `process` listens on `port`; PipelineError when it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PipelineError(
                f"{process.name} exited with {process.poll()} while starting:\n{process.tail()}"
            )
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise PipelineError(f"{process.name} did not open port {port} within {timeout:.0f} s:\n{process.tail()}")


def to_argv(options: Mapping[str, object]) -> list[str]:
    """Options back into a command line: {"max_trials": 4} -> ["--max-trials", "4"]."""
    argv = []
    for key, value in options.items():
        text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        argv += [f"--{key.replace('_', '-')}", text]
    return argv


def child_env(parent: Run) -> dict[str, str]:
    """A stage process's environment (trial.child_environment: our tracking store, this copy
    of the package, no MLFLOW_RUN_ID) in the parent run's experiment."""
    from pipeline import trial

    return {**trial.child_environment(), "MLFLOW_EXPERIMENT_ID": parent.info.experiment_id}


def search(options: Mapping[str, object], workers: int, parent: Run, log_dir: Path) -> int:
    """Run `python -m pipeline.tune` as a Keras Tuner chief and `workers` workers on loopback.

    The chief serves the oracle, then summarises the search into `parent` (it resumes
    that run); the workers run trials, each a child run of `parent`. A worker that
    dies is started again with the same KERASTUNER_TUNER_ID, so the chief hands it
    the same trial (Keras Tuner keeps a worker's trial until that worker ends it),
    up to config.MAX_WORKER_RESTARTS times each. Returns the number of restarts;
    raises PipelineError, with the end of its log, when the chief fails or a worker
    keeps failing. Every process is stopped on the way out.
    """
    port = free_port()
    env = {**child_env(parent), ORACLE_IP_ENV: LOOPBACK, ORACLE_PORT_ENV: str(port)}
    command = [sys.executable, "-m", "pipeline.tune", *to_argv(options)]
    chief = Process(
        CHIEF, command, {**env, TUNER_ID_ENV: CHIEF, "MLFLOW_RUN_ID": parent.info.run_id}, log_dir
    )
    tuners = [
        Process(
            f"tuner{index}",
            [*command, "--parent-run-id", parent.info.run_id],
            {**env, TUNER_ID_ENV: f"tuner{index}"},
            log_dir,
        )
        for index in range(workers)
    ]
    finished = False
    try:
        chief.start()
        wait_for_port(port, chief)
        log.info("Keras Tuner chief serves on %s:%d; starting %d workers", LOOPBACK, port, workers)
        for tuner in tuners:
            tuner.start()
        while chief.poll() is None:
            for tuner in tuners:
                _restart_if_dead(tuner)
            time.sleep(0.5)
        if chief.poll() != 0:
            raise PipelineError(f"the Keras Tuner chief failed (exit {chief.poll()}):\n{chief.tail()}")
        for tuner in tuners:
            if tuner.wait(config.CLUSTER_STOP_TIMEOUT_S) is None:
                log.warning("%s still runs after the chief ended; stopping it", tuner.name)
        finished = True
        return sum(tuner.starts - 1 for tuner in tuners)
    finally:
        for process in [*tuners, chief]:
            process.stop()
        if not finished:
            end_running_children(parent.info.run_id, {}, RunStatus.KILLED)


def _restart_if_dead(tuner: Process) -> None:
    code = tuner.poll()
    if code in (None, 0):
        return
    if tuner.starts > config.MAX_WORKER_RESTARTS:
        raise PipelineError(
            f"Keras Tuner worker {tuner.name} failed {tuner.starts} times (last exit {code}); "
            f"stopping the search (run it again with resume=true to continue):\n{tuner.tail()}"
        )
    log.warning(
        "worker %s exited with %s mid-search; starting it again (%d of %d) to take its trial back",
        tuner.name,
        code,
        tuner.starts,
        config.MAX_WORKER_RESTARTS,
    )
    tuner.start()


def train(options: Mapping[str, object], workers: int, parent: Run, log_dir: Path) -> None:
    """Run `python -m pipeline.train` as `workers` MultiWorkerMirroredStrategy workers on loopback.

    Each gets a TF_CONFIG naming every worker's address and its own index; worker 0 is
    the chief, resumes `parent` and logs and registers the model. TensorFlow's
    collectives wait for every worker, so one that fails stops them all: raises
    PipelineError with the end of its log.
    """
    addresses = [f"{LOOPBACK}:{free_port()}" for _ in range(workers)]
    env = child_env(parent)
    command = [sys.executable, "-m", "pipeline.train", *to_argv(options)]
    members = [
        Process(
            f"worker{index}",
            command,
            {
                **env,
                TF_CONFIG_ENV: tf_config_for(addresses, index),
                **({"MLFLOW_RUN_ID": parent.info.run_id} if index == 0 else {}),
            },
            log_dir,
        )
        for index in range(workers)
    ]
    log.info("starting %d MultiWorkerMirroredStrategy workers on %s", workers, ", ".join(addresses))
    try:
        for member in members:
            member.start()
        while any(member.poll() is None for member in members):
            for member in members:
                if member.poll() not in (None, 0):
                    raise PipelineError(
                        f"training worker {member.name} failed (exit {member.poll()}); "
                        f"stopping the others:\n{member.tail()}"
                    )
            time.sleep(0.5)
        failed = [member for member in members if member.poll() != 0]
        if failed:
            raise PipelineError(f"training worker {failed[0].name} failed:\n{failed[0].tail()}")
    finally:
        for member in members:
            member.stop()


def end_running_children(parent_run_id: str, tags: Mapping[str, str], status: int) -> list[str]:
    """End the still-RUNNING child runs of `parent_run_id` that carry `tags`; returns their ids.

    A child run whose process was killed stays RUNNING in the store; whoever knows
    that process is gone (its restarted successor, or the launcher) ends it.
    """
    filters = [f"tags.`mlflow.parentRunId` = '{parent_run_id}'", "attributes.status = 'RUNNING'"]
    filters += [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    try:
        runs = mlflow.search_runs(
            experiment_ids=[mlflow.get_run(parent_run_id).info.experiment_id],
            filter_string=" and ".join(filters),
            output_format="list",
        )
    except MlflowException as error:
        log.warning("could not look for orphaned runs under %s: %s", parent_run_id, error)
        return []
    client = mlflow.MlflowClient()
    for run in runs:
        client.set_terminated(run.info.run_id, RunStatus.to_string(status))
        log.info(
            "ended orphaned run %s (%s) as %s",
            run.info.run_id,
            run.info.run_name,
            RunStatus.to_string(status),
        )
    return [run.info.run_id for run in runs]
