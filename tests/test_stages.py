"""Each stage's command line against a real SQLite store: what it logs and how it fails."""

import mlflow
import numpy as np
import pytest

from pipeline import build, config, ingest, onehot, tracking


def only_run(stage):
    runs = mlflow.search_runs(
        experiment_names=["tests"],
        filter_string=f"tags.`{config.STAGE_TAG}` = '{stage}'",
        output_format="list",
    )
    assert len(runs) == 1
    return runs[0]


def artifact_names(run, path):
    return {item.path.split("/")[-1] for item in mlflow.MlflowClient().list_artifacts(run.info.run_id, path)}


def test_ingest_logs_params_artifacts_and_dataset_inputs(mlflow_store, dataset_zip):
    ingest.main(["--source", str(dataset_zip), "--seed", "3"])
    run = only_run("ingest")
    assert run.info.status == "FINISHED"
    assert run.data.params["seed"] == "3" and run.data.params["source"] == str(dataset_zip)
    assert run.data.params["image_size"] == str(config.IMAGE_SIZE)
    assert run.data.metrics["num_images"] == 40 and run.data.metrics["num_skipped"] == 0
    assert artifact_names(run, config.INGEST_ARTIFACT) == {
        config.IMAGES_FILE,
        config.MANIFEST_FILE,
        config.SKIPPED_FILE,
        config.COUNTS_FILE,
        config.PREVIEW_FILE,
    }
    inputs = {dataset.dataset.name: dataset for dataset in run.inputs.dataset_inputs}
    assert set(inputs) == {f"{config.DATASET_NAME}-{split}" for split in config.SPLITS}
    # The digest is ours, over every pixel: recompute it from the logged arrays.
    arrays = ingest.load(tracking.download(run, config.INGEST_ARTIFACT))
    expected = ingest.digest(arrays["x_test"], arrays["y_test"])
    assert inputs[f"{config.DATASET_NAME}-test"].dataset.digest == expected


def test_onehot_encodes_the_latest_ingest_run(mlflow_store, dataset_dir):
    ingest.main(["--source", str(dataset_dir)])
    onehot.main([])
    ingest_run, onehot_run = only_run("ingest"), only_run("onehot")
    assert onehot_run.data.tags[config.INGEST_RUN_TAG] == ingest_run.info.run_id
    labels = onehot.load(tracking.download(onehot_run, config.ONEHOT_ARTIFACT))
    assert labels["y_train"].shape[1] == 10 and np.all(labels["y_train"].sum(axis=1) == 1)


@pytest.mark.slow
def test_build_logs_parameter_count_and_architecture(mlflow_store):
    build.main([])
    run = only_run("build")
    assert run.data.metrics["num_params"] == 23_608_202
    assert run.data.metrics["num_trainable_params"] < run.data.metrics["num_params"]
    assert artifact_names(run, config.BUILD_ARTIFACT) == {config.ARCHITECTURE_FILE, config.SUMMARY_FILE}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--val-fraction", "1.5"], "--val-fraction: must lie strictly between 0 and 1"),
        (["--image-size", "0"], "--image-size: must be a whole number from 32 to 1024"),
        (["--seed", "x"], "--seed: must be a number"),
        (["--sha256", "abc"], "--sha256: must be 64 hexadecimal digits"),
    ],
)
def test_bad_options_exit_2_naming_the_option_and_log_nothing(mlflow_store, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        ingest.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_cross_parameter_check_happens_before_any_run(mlflow_store, caplog):
    with pytest.raises(SystemExit):
        ingest.main(["--val-fraction", "0.6", "--test-fraction", "0.5", "--source", "nowhere"])
    assert "val_fraction + test_fraction" in caplog.text
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_missing_source_is_refused_with_a_clear_message_before_any_run(mlflow_store, tmp_path, caplog):
    with pytest.raises(SystemExit) as exit_info:
        ingest.main(["--source", str(tmp_path / "missing.zip")])
    assert exit_info.value.code == 2
    assert "missing.zip' does not exist" in caplog.text
    assert "Traceback" not in caplog.text
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_source_that_breaks_after_the_checks_fails_the_run(mlflow_store, tmp_path, caplog):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "hand.jpg").write_bytes(b"not in a known layout")
    with pytest.raises(SystemExit) as exit_info:
        ingest.main(["--source", str(tmp_path / "photos")])
    assert exit_info.value.code == 2
    assert "found no images in a known layout" in caplog.text
    assert "Traceback" not in caplog.text
    assert only_run("ingest").info.status == "FAILED"


def test_onehot_given_a_build_run_id_refuses_it(mlflow_store, caplog):
    with mlflow.start_run(experiment_id=mlflow.set_experiment("tests").experiment_id) as other:
        mlflow.set_tag(config.STAGE_TAG, "build")
    with pytest.raises(SystemExit):
        onehot.main(["--ingest-run-id", other.info.run_id])
    assert "ingest_run_id: run " in caplog.text and "is of stage 'build', not 'ingest'" in caplog.text
