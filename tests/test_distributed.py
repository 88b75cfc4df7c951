"""Distributed tuning and multi-worker training on loopback, each process real, settings tiny.

Each test starts the one documented command (`python -m pipeline.tune --workers 2`,
`python -m pipeline.train --strategy multiworker --workers 2`) in its own session,
with tracking, data and tuner state under tmp_path, and kills that session's
processes afterwards whatever happened.
"""

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import ROOT, make_tree

from pipeline import config, ingest, onehot, tune

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TIMEOUT_S = 900  # a whole command on two shared cores


@pytest.fixture
def store(mlflow_store, tmp_path, monkeypatch):
    """Finished ingest and onehot runs of 4 small photos per digit; tuner state under tmp_path."""
    monkeypatch.setenv(config.TUNER_DIR_ENV, str(tmp_path / "tuner"))
    ingest.main(["--source", str(make_tree(tmp_path / "photos", per_class=4)), "--image-size", "32"])
    onehot.main([])
    return mlflow_store


@pytest.fixture
def sessions():
    """Commands started by the test; each one's whole process group is killed at the end."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def start(sessions, tmp_path: Path, stage: str, *options: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with open(tmp_path / f"{stage}.log", "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", f"pipeline.{stage}", *options],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    sessions.append(process)
    return process


def finish(process: subprocess.Popen, tmp_path: Path, stage: str) -> None:
    code = process.wait(TIMEOUT_S)
    assert code == 0, (tmp_path / f"{stage}.log").read_text()[-5000:]


def tune_command(sessions, tmp_path, max_trials: int) -> subprocess.Popen:
    return start(
        sessions,
        tmp_path,
        "tune",
        *("--workers", "2", "--oracle", "random", "--max-trials", str(max_trials)),
        *("--epochs-per-trial", "1", "--precision", "float32"),
    )


def runs(stage: str, **filters: str) -> list:
    clauses = [f"tags.`{config.STAGE_TAG}` = '{stage}'"] + [f"tags.`{k}` = '{v}'" for k, v in filters.items()]
    return mlflow.search_runs(
        experiment_names=["tests"],
        filter_string=" and ".join(clauses),
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )


def the_search_run():
    (search,) = runs("tune")
    assert search.info.status == "FINISHED"
    return search


def trial_runs(search) -> list:
    return runs(tune.TRIAL_STAGE, **{"mlflow.parentRunId": search.info.run_id})


def artifact(run, path: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path))


def child_with_env(parent_pid: int, name: str, value: str) -> int | None:
    """The pid of a child of `parent_pid` whose environment holds name=value (Linux /proc)."""
    wanted = f"{name}={value}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent_pid and wanted in (entry / "environ").read_bytes().split(b"\0"):
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def wait_for(condition, process: subprocess.Popen, seconds: float = TIMEOUT_S):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert process.poll() is None, "the command ended before the condition held"
        time.sleep(0.3)
    raise AssertionError(f"no {condition.__name__} within {seconds} s")


def test_a_chief_and_two_workers_run_every_trial_once_under_one_search_run(store, sessions, tmp_path):
    finish(tune_command(sessions, tmp_path, max_trials=4), tmp_path, "tune")
    search = the_search_run()
    trials = trial_runs(search)
    # Every trial ran once, each a child run of the search run, spread over both workers.
    assert sorted(run.data.tags[tune.TRIAL_ID_TAG] for run in trials) == ["0", "1", "2", "3"]
    assert {run.info.status for run in trials} == {"FINISHED"}
    assert {run.data.tags[tune.TUNER_ID_TAG] for run in trials} == {"tuner0", "tuner1"}
    assert search.data.metrics["worker_restarts"] == 0 and search.data.metrics["num_trials"] == 4
    # The search run reports the best trial, as a one-process search does.
    table = pd.read_csv(
        artifact(search, f"{config.TUNE_ARTIFACT}/{config.TRIALS_FILE}"), dtype={"trial_id": str}
    )
    assert set(table["status"]) == {"COMPLETED"}
    assert set(table["run_id"]) == {run.info.run_id for run in trials}
    top = max(run.data.metrics["best_val_accuracy"] for run in trials)
    best = min(
        (run for run in trials if run.data.metrics["best_val_accuracy"] == top),
        key=lambda run: int(run.data.tags[tune.TRIAL_ID_TAG]),  # the first one on a tie
    )
    assert search.data.metrics["best_val_accuracy"] == top
    assert search.data.params["best_learning_rate"] == best.data.params["learning_rate"]
    logs = {entry.path for entry in mlflow.MlflowClient().list_artifacts(search.info.run_id, "logs")}
    assert logs == {"logs/chief.log", "logs/tuner0.log", "logs/tuner1.log"}


def test_a_worker_killed_mid_trial_is_restarted_and_its_trial_run_again(store, sessions, tmp_path):
    launcher = tune_command(sessions, tmp_path, max_trials=4)

    def a_trial_of_tuner1():
        running = runs(tune.TRIAL_STAGE, **{tune.TUNER_ID_TAG: "tuner1"})
        return running[0] if running and running[0].info.status == "RUNNING" else None

    victim = wait_for(a_trial_of_tuner1, launcher)
    pid = child_with_env(launcher.pid, "KERASTUNER_TUNER_ID", "tuner1")
    os.kill(pid, signal.SIGKILL)
    finish(launcher, tmp_path, "tune")

    search = the_search_run()
    trials = trial_runs(search)
    status = {run.info.run_id: run.info.status for run in trials}
    assert status[victim.info.run_id] == "KILLED"
    # Each trial finished exactly once; the killed one was run again by the restarted tuner1.
    finished = [run for run in trials if run.info.status == "FINISHED"]
    assert collections.Counter(run.data.tags[tune.TRIAL_ID_TAG] for run in finished) == {
        "0": 1,
        "1": 1,
        "2": 1,
        "3": 1,
    }
    retried = [
        run for run in finished if run.data.tags[tune.TRIAL_ID_TAG] == victim.data.tags[tune.TRIAL_ID_TAG]
    ]
    assert retried[0].data.tags[tune.TUNER_ID_TAG] == "tuner1"
    assert search.data.metrics["worker_restarts"] == 1
    table = pd.read_csv(
        artifact(search, f"{config.TUNE_ARTIFACT}/{config.TRIALS_FILE}"), dtype={"trial_id": str}
    )
    assert list(table["status"]) == ["COMPLETED"] * 4
    assert set(table["run_id"]) == {run.info.run_id for run in finished}
    assert artifact(search, "logs/tuner1.log").read_text().count("--- start") == 2


def test_two_multiworker_workers_train_one_registered_model(store, sessions, tmp_path):
    training = start(
        sessions,
        tmp_path,
        "train",
        *("--strategy", "multiworker", "--workers", "2", "--epochs", "1", "--min-epochs", "0"),
        *("--batch-size", "8", "--precision", "float32", "--model-name", "tiny-digits"),
    )
    finish(training, tmp_path, "train")
    (run,) = runs("train")
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy"] == "multiworker" and run.data.params["workers"] == "2"
    assert run.data.tags[config.MODEL_VERSION_TAG] == "1" and run.data.metrics["epochs_trained"] == 1
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
    assert [metric.step for metric in history] == [0]  # the chief alone logs each epoch
    logs = {entry.path for entry in mlflow.MlflowClient().list_artifacts(run.info.run_id, "logs")}
    assert logs == {"logs/worker0.log", "logs/worker1.log"}
    model = mlflow.pyfunc.load_model("models:/tiny-digits/1")
    photos = ingest.load(
        artifact(mlflow.get_run(run.data.tags[config.INGEST_RUN_TAG]), config.INGEST_ARTIFACT)
    )
    predictions = model.predict(pd.DataFrame({"image": list(photos["x_test"])}))
    assert len(predictions) == len(photos["x_test"]) and predictions["digit"].between(0, 9).all()
