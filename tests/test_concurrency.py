"""Stages started at the same time on the default SQLite store: every run, param and metric lands."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, make_tree

from pipeline import config, ingest, onehot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPERIMENT = "concurrent"
INGEST_PARAMS = {"source", "sha256", "image_size", "val_fraction", "test_fraction", "seed", "max_per_class"}
INGEST_METRICS = {"num_images", "num_skipped", "num_train", "num_val", "num_test", config.PEAK_RSS_METRIC}


def environment(tmp_path: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
        "SIGN_DIGITS_DATA_DIR": str(tmp_path / "input_dataset"),
        "SIGN_DIGITS_TUNER_DIR": str(tmp_path / "tuner"),
        "TMPDIR": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    return env


def runs(tmp_path: Path, stage: str | None = None) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    where = f"tags.`{config.STAGE_TAG}` = '{stage}'" if stage else ""
    return mlflow.search_runs(experiment_names=[EXPERIMENT], filter_string=where, output_format="list")


def assert_complete_ingest(run) -> None:
    assert run.info.status == "FINISHED", run.info
    assert INGEST_PARAMS <= set(run.data.params), run.data.params
    assert set(run.data.metrics) == INGEST_METRICS and run.data.metrics["num_images"] == 40
    assert len(run.inputs.dataset_inputs) == 3
    listed = mlflow.MlflowClient().list_artifacts(run.info.run_id, config.INGEST_ARTIFACT)
    names = {item.path.split("/")[-1] for item in listed}
    assert config.IMAGES_FILE in names and config.MANIFEST_FILE in names


def test_four_ingests_started_at_once_on_a_new_store_all_finish(tmp_path):
    """MLflow creates a new SQLite store's tables without a lock; before tracking.configure
    took one, two of three stages started together died with 'duplicate column name'."""
    source = make_tree(tmp_path / "photos", per_class=4)
    env = environment(tmp_path)
    command = [sys.executable, "-m", "pipeline.ingest", "--source", str(source), "--image-size", "32"]
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
    processes = [
        subprocess.Popen([*command, "--seed", str(seed)], cwd=tmp_path, env=env, **output)
        for seed in range(4)
    ]
    outputs = [process.communicate(timeout=300)[0].decode(errors="replace") for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    finished = runs(tmp_path, "ingest")
    assert sorted(run.data.params["seed"] for run in finished) == ["0", "1", "2", "3"]
    for run in finished:
        assert_complete_ingest(run)
        # A new store's artifacts go to ./mlruns of the working folder: tmp_path, not the checkout.
        artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
        assert artifacts.is_relative_to(tmp_path), artifacts


def mlflow_run(entry_point: str, env: dict, *params: str) -> list[str]:
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry_point]
    command += ["--env-manager", "local", "--experiment-name", EXPERIMENT]
    for param in params:
        command += ["-P", param]
    return command


def test_ingests_while_a_tune_runs_record_every_param_and_metric(tmp_path, monkeypatch):
    """Two `mlflow run`s at once (a search, and ingests one after another while it lasts)
    with a reader polling the store like the UI does: nothing is lost, nothing is locked."""
    env = environment(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    source = make_tree(tmp_path / "photos", per_class=4)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    mlflow.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    ingest.main(["--source", str(source), "--image-size", "32"])
    onehot.main([])
    tune_params = ["oracle=random", "max_trials=1", "epochs_per_trial=2", "precision=float32", "resume=false"]
    with open(tmp_path / "tune.log", "wb") as log:
        tune = subprocess.Popen(
            mlflow_run("tune", env, *tune_params), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    ingests, polls = [], 0
    try:
        while tune.poll() is None and len(ingests) < 3:
            done = subprocess.run(
                mlflow_run("ingest", env, f"source={source}", "image_size=32", f"seed={len(ingests) + 1}"),
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, done.stderr[-3000:]
            ingests.append(done)
            polls += len(runs(tmp_path))
        tune.wait(timeout=900)
    finally:
        if tune.poll() is None:
            tune.kill()
    log = (tmp_path / "tune.log").read_text(errors="replace")
    assert tune.returncode == 0, log[-3000:]
    assert "database is locked" not in log
    assert len(ingests) >= 2, "the search ended before two ingests could overlap it"
    # Every run finished with everything it logs.
    everything = runs(tmp_path)
    assert {run.info.status for run in everything} == {"FINISHED"}
    for run in runs(tmp_path, "ingest"):
        assert_complete_ingest(run)
    (search,) = runs(tmp_path, "tune")
    assert {"best_learning_rate", "best_batch_size", "max_trials", "oracle"} <= set(search.data.params)
    assert search.data.metrics["num_trials"] == 1 and "best_val_accuracy" in search.data.metrics
    (trial,) = [run for run in everything if run.data.tags.get("mlflow.parentRunId") == search.info.run_id]
    assert {"learning_rate", "batch_size"} <= set(trial.data.params)
    assert {"val_accuracy", "accuracy", "loss", "rss_mib"} <= set(trial.data.metrics)
    history = mlflow.MlflowClient().get_metric_history(trial.info.run_id, "val_accuracy")
    assert len(history) == 2  # one per epoch
    assert polls > 0  # the test read the store while both wrote, as the UI would
