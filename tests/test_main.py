"""`mlflow run .` end to end: the chain of child runs, failures, and reuse of finished steps."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT

from pipeline import config, steps, tracking

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def mlflow_run(tmp_path, *params, entry_point="main"):
    """Run an entry point as users do, with tracking and artifacts under tmp_path."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name("e2e") is None:
        mlflow.create_experiment("e2e", artifact_location=(tmp_path / "artifacts").as_uri())
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "SIGN_DIGITS_DATA_DIR": str(tmp_path / "input_dataset"),
        # `mlflow run` works in the project's folder: without these the search's state and
        # train's backups would land in the checkout the tests run from.
        config.TUNER_DIR_ENV: str(tmp_path / "tuner"),
        config.CHECKPOINT_DIR_ENV: str(tmp_path / "checkpoints"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        entry_point,
        "--env-manager",
        "local",
        "--experiment-name",
        "e2e",
    ]
    for param in params:
        command += ["-P", param]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def runs_by_entry_point():
    runs = mlflow.search_runs(experiment_names=["e2e"], output_format="list")
    return {
        run.data.tags["mlflow.project.entryPoint"]: run
        for run in runs
        if "mlflow.project.entryPoint" in run.data.tags  # not the tuning trials
    }


@pytest.mark.real_data
def test_main_runs_every_stage_and_the_champion_loads(tmp_path, real_archive):
    """A slice of the real photos, two one-epoch trials, one training epoch."""
    done = mlflow_run(
        tmp_path,
        f"source={real_archive}",
        "max_per_class=4",
        "image_size=32",
        "max_trials=2",
        "epochs_per_trial=1",
        "epochs=1",
        "min_epochs=0",
        "precision=float32",
        "min_accuracy=0",
        "model_name=e2e-digits",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = runs_by_entry_point()
    assert set(runs) == {"main", "ingest", "onehot", "build", "tune", "train", "evaluate"}
    parent = runs["main"].info.run_id
    for stage in ("ingest", "onehot", "build", "tune", "train", "evaluate"):
        assert runs[stage].info.status == "FINISHED", stage
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent
        assert runs["main"].data.tags[f"pipeline.{stage}_run_id"] == runs[stage].info.run_id
        assert runs[stage].data.tags[config.THREADS_TAG] == str(len(os.sched_getaffinity(0))), stage
        assert runs[stage].data.tags[config.PROCESSOR_TAG], stage
    assert runs["onehot"].data.params["ingest_run_id"] == runs["ingest"].info.run_id
    # 4 photos a digit, less one left out of training where the slice holds it in its training
    # split (2/IMG_5176.JPG in the shared copy; config.CONTRADICTED_LABELS).
    ingested = runs["ingest"].data.metrics
    assert ingested["num_images"] + ingested["num_skipped"] == 40 and ingested["num_skipped"] <= 1
    trials = mlflow.search_runs(
        experiment_names=["e2e"],
        filter_string=f"tags.`mlflow.parentRunId` = '{runs['tune'].info.run_id}'",
        output_format="list",
    )
    assert len(trials) == 2
    assert any((tmp_path / "tuner").iterdir())  # the search's state, kept out of the checkout
    assert runs["train"].data.params["tune_run_id"] == runs["tune"].info.run_id
    assert runs["evaluate"].data.tags["pipeline.promoted"] == "true"
    assert any((tmp_path / "artifacts").rglob(config.IMAGES_FILE))
    champion = mlflow.pyfunc.load_model("models:/e2e-digits@champion")
    photo = np.full((100, 100, 3), 128, dtype=np.uint8)
    predictions = champion.predict(pd.DataFrame({"image": [photo]}))
    assert predictions["digit"].between(0, 9).all()


def test_a_failing_step_stops_the_chain_with_its_error(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "hand.jpg").write_bytes(b"not in a known layout")
    done = mlflow_run(tmp_path, f"source={tmp_path / 'photos'}")
    assert done.returncode != 0
    assert "found no images in a known layout" in done.stderr
    assert "step ingest failed" in done.stderr
    runs = runs_by_entry_point()
    assert set(runs) == {"main", "ingest"}
    assert runs["main"].info.status == "FAILED" and runs["ingest"].info.status == "FAILED"


def test_an_impossible_parameter_stops_main_before_its_first_step(tmp_path):
    done = mlflow_run(tmp_path, f"source={tmp_path}", "learning_rate=1.5")
    assert done.returncode != 0
    assert "--learning-rate: must lie strictly between 0 and 1, got 1.5" in done.stderr
    assert set(runs_by_entry_point()) == {"main"}


@pytest.mark.real_data
def test_single_entry_point_on_the_real_archive(tmp_path, real_archive):
    done = mlflow_run(tmp_path, f"source={real_archive}", "max_per_class=5", entry_point="ingest")
    assert done.returncode == 0, done.stderr[-3000:]
    run = runs_by_entry_point()["ingest"]
    assert run.data.metrics["num_images"] == 50 and run.data.metrics["num_skipped"] == 0
    assert len(run.inputs.dataset_inputs) == 3


def test_reuse_needs_same_typed_params_and_the_same_clean_commit(mlflow_store):
    experiment = mlflow.set_experiment("tests").experiment_id
    clean = {config.COMMIT_TAG: "a" * 40, config.DIRTY_TAG: "false"}
    with mlflow.start_run() as finished:
        mlflow.set_tags({"mlflow.project.entryPoint": "onehot", **clean})
        mlflow.log_params({"ingest_run_id": "abc", "num_classes": "10"})
    same = {"ingest_run_id": "abc", "num_classes": 10}
    # Same values typed differently ("10.0" vs "10") are the same parameters.
    found = steps.find_reusable("onehot", {**same, "num_classes": "10.0"}, experiment, clean)
    assert found.info.run_id == finished.info.run_id
    assert steps.find_reusable("onehot", {**same, "ingest_run_id": "xyz"}, experiment, clean) is None
    other_commit = {config.COMMIT_TAG: "b" * 40, config.DIRTY_TAG: "false"}
    assert steps.find_reusable("onehot", same, experiment, other_commit) is None
    dirty = {**clean, config.DIRTY_TAG: "true"}
    assert steps.find_reusable("onehot", same, experiment, dirty) is None


def test_params_logged_shell_quoted_by_mlflow_run_compare_equal():
    # `mlflow run` logs "-P sha256=" as "''" and a path with a space as "'/a b.zip'".
    stored = {"source": "'/data/a b.zip'", "sha256": "''", "image_size": "32", "num_images": "40"}
    given = {"source": "/data/a b.zip", "sha256": "", "image_size": 32}
    assert steps.typed("ingest", stored) == steps.typed("ingest", given) is not None


def test_an_unfinished_tune_or_train_run_is_found_to_continue(mlflow_store):
    experiment = mlflow.set_experiment("tests").experiment_id
    version = {config.COMMIT_TAG: "a" * 40, config.DIRTY_TAG: "true"}  # dirty is fine here
    client = mlflow.MlflowClient()
    params = {"onehot_run_id": "abc", "epochs": "4"}
    runs = {}
    for name, status, process in [
        ("killed", "KILLED", None),
        ("alive", "RUNNING", tracking.process_id()),
        ("finished", "FINISHED", None),
    ]:
        run = client.create_run(experiment, tags={config.STAGE_TAG: "train", **version})
        for key, value in {**params, "tuned_batch_size": "16"}.items():  # tuned_*: logged by train itself
            client.log_param(run.info.run_id, key, value)
        if process:
            client.set_tag(run.info.run_id, config.PROCESS_TAG, process)
        else:
            client.set_terminated(run.info.run_id, status)
        runs[name] = run.info.run_id
    # The latest unfinished one whose process is gone; never one whose process still runs.
    found = steps.find_unfinished("train", {"onehot_run_id": "abc", "epochs": 4.0}, experiment, version)
    assert found.info.run_id == runs["killed"]
    assert steps.find_unfinished("train", {**params, "epochs": 5}, experiment, version) is None
    other = {**version, config.COMMIT_TAG: "b" * 40}
    assert steps.find_unfinished("train", params, experiment, other) is None
