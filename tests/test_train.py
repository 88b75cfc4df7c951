"""The train stage: a real (tiny) training run, its records, and the registered model."""

import json
import logging

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import make_tree

from pipeline import config, fitting, ingest, onehot, serving, tracking, train
from pipeline.errors import PipelineError


@pytest.fixture
def tiny_arrays(tmp_path):
    """Three small photos per digit at 32x32, the smallest size ResNet50 takes."""
    root = make_tree(tmp_path / "photos", per_class=3)
    result = ingest.run(str(root), tmp_path / "dataset", image_size=32, data_dir=tmp_path / "cache")
    arrays = dict(result.arrays)
    for split in config.SPLITS:
        arrays[f"y_{split}"] = onehot.encode(arrays[f"y_{split}"])
    return arrays


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"learning_rate": 0}, "learning_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"patience": -1}, "patience"),
        ({"min_epochs": -2}, "min_epochs"),
    ],
)
def test_impossible_parameters_are_named(options, name):
    values = {"learning_rate": 1e-3, "batch_size": 8, "epochs": 1, "patience": 0, "min_epochs": 0, **options}
    with pytest.raises(PipelineError, match=name):
        train.check_params(**values)


@pytest.mark.slow
def test_run_trains_logs_each_epoch_and_writes_curves(mlflow_store, tiny_arrays, tmp_path, traced):
    with mlflow.start_run() as run:
        model, history, kept = train.run(
            tiny_arrays,
            tmp_path / "out",
            run.info.run_id,
            batch_size=8,
            epochs=2,
            min_epochs=0,
            precision="float32",
        )
    assert not model.run_eagerly  # the traced train step users run
    assert list(history["epoch"]) == [0, 1]
    # Both epochs trained lie in the averaging window: the model is their mean.
    assert history["kept"].all() and kept["averaged_epochs"] == 2 and kept["epoch"] == 2
    assert 0 <= kept["val_accuracy"] <= 1
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.columns)
    assert (tmp_path / "out" / config.CURVES_FILE).stat().st_size > 1000
    assert pd.read_csv(tmp_path / "out" / config.HISTORY_FILE).shape[0] == 2
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")]
    assert steps == [0, 1]
    probabilities = model.predict(tiny_arrays["x_test"].astype("float32"), verbose=0)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-3)


@pytest.mark.slow
def test_a_run_stopped_early_keeps_its_best_epoch_not_an_average(tiny_arrays, tmp_path):
    _, history, kept = train.run(
        tiny_arrays, tmp_path / "out", None, batch_size=8, epochs=8, patience=0, min_epochs=0
    )
    assert len(history) < 8  # stopped at the first epoch that did not improve on the best
    best = int(history["val_accuracy"].to_numpy().argmax())
    assert kept["averaged_epochs"] == 0 and kept["epoch"] == best + 1
    assert list(history["kept"]) == [epoch == best for epoch in range(len(history))]
    assert kept["val_accuracy"] == pytest.approx(history["val_accuracy"].max())


@pytest.mark.slow
def test_the_same_seed_trains_the_same_model(tiny_arrays, tmp_path):
    def weights(seed):
        model, _, _ = train.run(
            tiny_arrays, tmp_path / f"out-{seed}", None, batch_size=4, epochs=2, min_epochs=0, seed=seed
        )
        return model.get_weights()

    first = weights(seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, weights(seed=3), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, weights(seed=4), strict=True))


@pytest.mark.slow
@pytest.mark.integration
def test_main_registers_a_model_that_loads_by_name(mlflow_store, tmp_path):
    root = make_tree(tmp_path / "photos", per_class=3)
    ingest.main(["--source", str(root), "--image-size", "32"])
    onehot.main([])
    train.main(
        [
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--min-epochs",
            "0",
            "--precision",
            "float32",
            "--model-name",
            "tiny-digits",
        ]
    )
    runs = mlflow.search_runs(
        experiment_names=["tests"], filter_string="tags.`pipeline.stage` = 'train'", output_format="list"
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags[config.MODEL_VERSION_TAG] == "1"
    assert run.data.metrics["epochs_trained"] == 1
    assert not list((tmp_path / "checkpoints").glob("train-*/"))  # the backup goes once the run finished
    assert run.data.tags[config.INGEST_RUN_TAG]
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, config.TRAIN_ARTIFACT)}
    assert {
        f"{config.TRAIN_ARTIFACT}/{config.CURVES_FILE}",
        f"{config.TRAIN_ARTIFACT}/{config.HISTORY_FILE}",
    } <= names
    model = mlflow.pyfunc.load_model("models:/tiny-digits/1")
    # The served stages in bfloat16 were picked on the validation photos and are the ones logged.
    stages = model.model_config[serving.BFLOAT16_STAGES_KEY]
    assert tuple(stages) in config.SERVING_BFLOAT16_CANDIDATES + ((),)
    assert run.data.tags[config.SERVING_STAGES_TAG] == (",".join(map(str, stages)) or "none")
    assert 0 <= run.data.metrics["serving_validation_probability_gap"] <= config.SERVING_MAX_PROBABILITY_GAP
    # So was the test-time shift: served only when it lowered the validation loss.
    shift = model.model_config[serving.TEST_TIME_SHIFT_KEY]
    assert run.data.tags[config.SERVING_SHIFT_TAG] == str(shift)
    losses = [run.data.metrics[f"serving_validation_loss_{how}"] for how in ("single_view", "shifted")]
    assert shift == (config.TEST_TIME_SHIFT if losses[1] < losses[0] else 0)
    errors = [run.data.metrics[f"serving_validation_errors_{how}"] for how in ("single_view", "shifted")]
    assert all(0 <= count <= config.NUM_CLASSES for count in errors)  # one validation photo a digit
    ingest_run = tracking.find_run("ingest", run.data.tags[config.INGEST_RUN_TAG])
    photos = ingest.load(tracking.download(ingest_run, config.INGEST_ARTIFACT))
    predictions = model.predict(pd.DataFrame({"image": list(photos["x_test"])}))
    assert len(predictions) == len(photos["x_test"]) and predictions["digit"].between(0, 9).all()


def test_tune_run_id_of_another_stage_is_refused(mlflow_store):
    with mlflow.start_run() as other:
        mlflow.set_tag(config.STAGE_TAG, "ingest")
    with pytest.raises(PipelineError, match="of stage .ingest., not .tune."):
        train.tuned_hyperparameters(other.info.run_id)


def tune_then_train(tmp_path, monkeypatch, train_options):
    """A one-trial search of 1 epoch that starts a 3-epoch training, then train on its result."""
    from pipeline import tune

    monkeypatch.setenv(config.TUNER_DIR_ENV, str(tmp_path / "tuner"))
    ingest.main(["--source", str(make_tree(tmp_path / "photos", per_class=3)), "--image-size", "32"])
    onehot.main([])
    search = ["--oracle", "random", "--max-trials", "1", "--epochs-per-trial", "1", "--train-epochs", "3"]
    tune.main([*search, "--precision", "float32"])
    tune_run = tracking.find_run("tune", "")
    train.main(["--tune-run-id", tune_run.info.run_id, "--precision", "float32", *train_options])
    return tune_run, tracking.find_run("train", "")


@pytest.mark.slow
@pytest.mark.integration
def test_train_continues_the_search_best_trial_as_its_first_epochs(
    mlflow_store, tmp_path, monkeypatch, caplog
):
    options = ["--epochs", "3", "--min-epochs", "1", "--test-time-augmentation", "on"]
    tune_run, run = tune_then_train(tmp_path, monkeypatch, options)
    # Test-time augmentation forced on, whatever the validation errors say.
    assert run.data.tags[config.SERVING_SHIFT_TAG] == str(config.TEST_TIME_SHIFT)
    client = mlflow.MlflowClient()
    (trial_run,) = mlflow.search_runs(
        experiment_names=["tests"],
        filter_string=f"tags.`mlflow.parentRunId` = '{tune_run.info.run_id}'",
        output_format="list",
    )
    assert run.data.tags[config.STARTED_FROM_TAG] == trial_run.info.run_id
    # The trial's epoch is the training's first, logged from its state: its own timing, not a new one.
    (trial_epoch,) = client.get_metric_history(trial_run.info.run_id, "epoch_time_s")
    epoch_times = sorted(client.get_metric_history(run.info.run_id, "epoch_time_s"), key=lambda m: m.step)
    assert [m.step for m in epoch_times] == [0, 1, 2]
    assert epoch_times[0].value == trial_epoch.value
    assert epoch_times[1].value != trial_epoch.value
    # The learning rate goes on along the 3-epoch schedule the trial started.
    rates = sorted(client.get_metric_history(run.info.run_id, "learning_rate"), key=lambda m: m.step)
    assert rates[0].value == client.get_metric_history(trial_run.info.run_id, "learning_rate")[0].value
    assert rates[0].value < rates[1].value  # warm-up: the step counter came with the state
    assert run.data.metrics["epochs_trained"] == 3 and run.data.tags[config.MODEL_VERSION_TAG] == "1"
    # The state left the search's folder with the tune run; the training's backup went at its end.
    assert not list((tmp_path / "tuner").glob(f"*/trial_*/{config.BEST_TRIAL_DIR}"))
    assert not list((tmp_path / "tuner").glob("*/trial_*/state"))
    assert not list((tmp_path / "checkpoints").glob("train-*/"))
    # A training the trial is not the start of starts from its first epoch, and says why.
    key = json.loads(
        tracking.download(
            tune_run, f"{config.TUNE_ARTIFACT}/{config.BEST_TRIAL_DIR}/{config.TRAINING_KEY_FILE}"
        ).read_text()
    )
    key = {name: value for name, value in key.items() if name != "trial_run_id"}
    backup_dir = tmp_path / "checkpoints" / "other"
    caplog.set_level(logging.INFO, logger="pipeline.train")
    for other, min_epochs, reason in [
        ({**key, "epochs": 2}, 1, "(epochs differ)"),  # another schedule
        ({**key, "seed": 43}, 1, "(seed differ)"),
        (key, 0, "more than min_epochs (0)"),  # epochs in which early stopping had a say
    ]:
        caplog.clear()
        assert (
            train.continue_trial(tune_run.info.run_id, other, min_epochs, backup_dir, run.info.run_id) is None
        )
        assert reason in caplog.text and "training from the first epoch" in caplog.text
        assert not backup_dir.exists()
    continued = train.continue_trial(tune_run.info.run_id, key, 1, backup_dir, run.info.run_id)
    assert continued == run.data.tags[config.STARTED_FROM_TAG]  # the control: the same search continues
    assert fitting.Backup.read(backup_dir)["run_id"] == run.info.run_id
