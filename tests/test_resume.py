"""Kill a stage for real (SIGKILL, Ctrl-C), run it again, and check what MLflow and the disk hold.

Each stage runs as users run it, in a process of its own, against a SQLite store under
tmp_path, on 3 or 4 small photos per digit at 32x32, with eager training steps
(conftest) so that no process spends a minute tracing ResNet50.
"""

import json
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

from pipeline import config, ingest, onehot, tracking, tune

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TIMEOUT_S = 600
STOP_TIMEOUT_S = 300  # for a stage to end its runs after Ctrl-C, on a machine busy with other work


@pytest.fixture
def store(mlflow_store, tmp_path, monkeypatch):
    """The test store with a finished ingest and onehot run; the environment for stage processes."""
    monkeypatch.setenv(config.TUNER_DIR_ENV, str(tmp_path / "tuner"))
    monkeypatch.setenv(config.CHECKPOINT_DIR_ENV, str(tmp_path / "checkpoints"))
    monkeypatch.setenv(config.BACKUP_INTERVAL_ENV, "0")  # a backup after every epoch
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    ingest.main(["--source", str(make_tree(tmp_path / "photos", per_class=3)), "--image-size", "32"])
    onehot.main([])
    return tmp_path


def start(command: list[str], log: Path) -> subprocess.Popen:
    """Start a command in a session of its own (so that signals reach only its processes),
    with Ctrl-C's default action, whatever this process inherited."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    with open(log, "a") as out:
        return subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=hear_ctrl_c,
        )


def hear_ctrl_c() -> None:
    # A shell starts background jobs (`make test &`, nohup) with SIGINT ignored, and children
    # inherit that: the stage would never see the Ctrl-C these tests send.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stage(name: str, *options: str, log: Path) -> subprocess.Popen:
    return start([sys.executable, "-m", f"pipeline.{name}", *options], log)


def wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = TIMEOUT_S):
    """Poll `condition` until it returns something truthy; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if process.poll() is not None:
            pytest.fail(
                f"exited {process.returncode} before the point to kill it:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.5)
    process.kill()
    pytest.fail(f"timed out waiting; log:\n{log.read_text()[-3000:]}")


def finish(process: subprocess.Popen, log: Path) -> None:
    assert process.wait(TIMEOUT_S) == 0, log.read_text()[-3000:]


def runs(stage_name: str, experiment: str = "tests"):
    return mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"tags.`{config.STAGE_TAG}` = '{stage_name}'",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )


def steps(run_id: str, key: str = "val_accuracy") -> list[int]:
    return sorted(metric.step for metric in mlflow.MlflowClient().get_metric_history(run_id, key))


def values(run_id: str, key: str) -> list[float]:
    history = mlflow.MlflowClient().get_metric_history(run_id, key)
    return [metric.value for metric in sorted(history, key=lambda metric: metric.step)]


def trial_processes(parent: int) -> list[int]:
    """The pids of pipeline.trial processes whose parent is `parent`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"pipeline.trial" in command:
            found.append(int(stat.parent.name))
    return found


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tracking._start_time(pid) is None:  # exited, or a zombie nobody collected yet
            return True
        time.sleep(0.2)
    return False


# train


TRAIN = ["--epochs", "4", "--min-epochs", "0", "--patience", "10", "--batch-size", "8"]
TRAIN += ["--precision", "float32", "--model-name", "resume-digits"]


def test_train_interrupted_then_killed_continues_in_one_run_as_if_never_stopped(store):
    log = store / "train.log"
    # Ctrl-C once the first epoch is logged.
    process = stage("train", *TRAIN, log=log)
    run_id = wait_for(
        lambda: next((r.info.run_id for r in runs("train") if steps(r.info.run_id)), None), process, log
    )
    process.send_signal(signal.SIGINT)
    assert process.wait(STOP_TIMEOUT_S) == 130, log.read_text()[-3000:]
    assert mlflow.get_run(run_id).info.status == "KILLED"
    (folder,) = (store / "checkpoints").glob("train-*/")
    state = json.loads((folder / "state.json").read_text())
    assert state["run_id"] == run_id and state["epoch"] >= 1
    # SIGKILL once three epochs are logged: the run stays RUNNING, its process gone.
    process = stage("train", *TRAIN, log=log)
    wait_for(lambda: len(steps(run_id)) >= 3, process, log)
    process.kill()
    process.wait()
    assert mlflow.get_run(run_id).info.status == "RUNNING"
    # Again: it continues the same run from the backup and finishes.
    finish(stage("train", *TRAIN, log=log), log)
    (run,) = runs("train")
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_time_s"):
        assert steps(run_id, key) == [0, 1, 2, 3], key  # each epoch exactly once
    assert run.data.metrics["epochs_trained"] == 4
    history = pd.read_csv(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=f"{config.TRAIN_ARTIFACT}/{config.HISTORY_FILE}"
        )
    )
    # The weights of all four epochs are averaged: the running mean survived the kill.
    assert list(history["epoch"]) == [0, 1, 2, 3] and history["kept"].all()
    assert run.data.metrics["averaged_epochs"] == 4
    assert run.data.tags[config.MODEL_VERSION_TAG] == "1"
    assert not folder.exists()
    assert "continuing the unfinished train run" in log.read_text()
    # The same training uninterrupted (a new run: that one finished) logs the same epochs: the
    # continued processes drew the done epochs' batches again before going on.
    finish(stage("train", *TRAIN, log=log), log)
    uninterrupted = runs("train")[1].info.run_id
    for key in ("loss", "val_loss"):
        assert values(uninterrupted, key) == values(run_id, key), key


# tune


TUNE = ["--oracle", "random", "--max-trials", "3", "--epochs-per-trial", "1", "--precision", "float32"]


def test_tune_interrupted_then_killed_completes_every_trial_once(store):
    log = store / "tune.log"
    # Ctrl-C while the first trial trains: its process is stopped, its run KILLED.
    process = stage("tune", *TUNE, log=log)
    (child,) = wait_for(lambda: trial_processes(process.pid), process, log)
    process.send_signal(signal.SIGINT)
    assert process.wait(STOP_TIMEOUT_S) == 130, log.read_text()[-3000:]
    assert wait_gone(child)
    (first,) = runs("tune")
    assert first.info.status == "KILLED"
    assert [(r.data.tags[tune.TRIAL_ID_TAG], r.info.status) for r in runs(tune.TRIAL_STAGE)] == [
        ("0", "KILLED")
    ]
    # SIGKILL to the search alone while its second trial trains: the trial's process dies with it.
    process = stage("tune", *TUNE, log=log)

    def second_trial_training():
        finished = [r for r in runs(tune.TRIAL_STAGE) if r.info.status == "FINISHED"]
        return trial_processes(process.pid) if finished else None

    (child,) = wait_for(second_trial_training, process, log)
    process.kill()
    process.wait()
    assert wait_gone(child), "the trial's process outlived the search"
    # Again: the interrupted trial runs again, the search completes.
    finish(stage("tune", *TUNE, log=log), log)
    tune_runs = runs("tune")
    assert [r.info.status for r in tune_runs] == ["KILLED", "KILLED", "FINISHED"]
    last = tune_runs[-1]
    assert last.data.metrics["num_trials"] == 3
    trials = pd.read_csv(
        mlflow.artifacts.download_artifacts(
            run_id=last.info.run_id, artifact_path=f"{config.TUNE_ARTIFACT}/{config.TRIALS_FILE}"
        ),
        dtype={"trial_id": str},
    )
    assert list(trials["trial_id"]) == ["0", "1", "2"] and set(trials["status"]) == {"COMPLETED"}
    trial_runs = runs(tune.TRIAL_STAGE)
    assert "RUNNING" not in {r.info.status for r in trial_runs}
    finished = sorted(r.data.tags[tune.TRIAL_ID_TAG] for r in trial_runs if r.info.status == "FINISHED")
    assert finished == ["0", "1", "2"]  # no trial finished twice
    assert set(trials["run_id"]) == {r.info.run_id for r in trial_runs if r.info.status == "FINISHED"}
    killed = [r.data.tags[tune.TRIAL_ID_TAG] for r in trial_runs if r.info.status == "KILLED"]
    assert sorted(killed) == ["0", "1"]  # the two interrupted trials, each run again
    for run in trial_runs:
        if run.info.status == "FINISHED":
            assert steps(run.info.run_id) == [0]
            assert int(run.data.tags[tune.TRIAL_PID_TAG]) not in (os.getpid(), process.pid)
            assert run.data.metrics["trial_peak_rss_mib"] > 100


# main


def entry_point_runs(experiment: str) -> dict[str, list]:
    found: dict[str, list] = {}
    for run in mlflow.search_runs(
        experiment_names=[experiment], order_by=["attributes.start_time ASC"], output_format="list"
    ):
        entry_point = run.data.tags.get("mlflow.project.entryPoint")
        if entry_point:
            found.setdefault(entry_point, []).append(run)
    return found


@pytest.mark.real_data
def test_main_killed_during_train_reuses_every_finished_step_and_continues_train(
    mlflow_store, tmp_path, monkeypatch, real_archive
):
    """A slice of the real photos, one one-epoch trial, three training epochs; the whole
    process tree is killed once training has logged an epoch."""
    if tracking.code_version()[config.DIRTY_TAG] != "false":
        pytest.skip("main reuses finished steps only from a clean git commit of pipeline/")
    monkeypatch.setenv(config.TUNER_DIR_ENV, str(tmp_path / "tuner"))
    monkeypatch.setenv(config.CHECKPOINT_DIR_ENV, str(tmp_path / "checkpoints"))
    monkeypatch.setenv(config.BACKUP_INTERVAL_ENV, "0")  # a backup after every epoch
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    mlflow.create_experiment("e2e", artifact_location=(tmp_path / "artifacts").as_uri())
    params = [
        f"source={real_archive}",
        "max_per_class=4",
        "image_size=32",
        "max_trials=1",
        "epochs_per_trial=1",
        "epochs=3",
        "min_epochs=0",
        "precision=float32",
        "min_accuracy=0",
        "model_name=resume-e2e",
    ]
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "main", "--env-manager", "local"]
    command += ["--experiment-name", "e2e", *(part for param in params for part in ("-P", param))]
    log = tmp_path / "main.log"
    process = start(command, log)

    def training_logged_an_epoch():
        return next((r for r in entry_point_runs("e2e").get("train", []) if steps(r.info.run_id)), None)

    train_run = wait_for(training_logged_an_epoch, process, log, timeout=900)
    os.killpg(process.pid, signal.SIGKILL)  # main, the step it runs, and mlflow run around them
    process.wait()
    finish(start(command, log), log)
    found = entry_point_runs("e2e")
    summary = {name: [(r.info.run_id[:8], r.info.status) for r in found[name]] for name in found}
    assert [r.info.status for r in found["main"]] == ["KILLED", "FINISHED"], summary
    first_main, second_main = (r.info.run_id for r in found["main"])
    for name in ("ingest", "onehot", "build", "tune"):  # finished before the kill: reused
        assert len(found[name]) == 1, summary
        (run,) = found[name]
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == first_main, name
        assert mlflow.get_run(second_main).data.tags[f"pipeline.{name}_run_id"] == run.info.run_id
    (train,) = found["train"]  # continued in its own run, moved under the new main run
    assert train.info.run_id == train_run.info.run_id and train.info.status == "FINISHED"
    assert train.data.tags["mlflow.parentRunId"] == second_main
    assert steps(train.info.run_id) == [0, 1, 2] and steps(train.info.run_id, "loss") == [0, 1, 2]
    assert [r.info.status for r in found["evaluate"]] == ["FINISHED"]
    assert not list((tmp_path / "checkpoints").glob("train-*/"))
