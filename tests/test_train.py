"""The train stage: a real (tiny) training run, its records, and the registered model."""

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import make_tree

from pipeline import config, ingest, onehot, tracking, train
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
def test_run_trains_logs_each_epoch_and_writes_curves(mlflow_store, tiny_arrays, tmp_path):
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
    ingest_run = tracking.find_run("ingest", run.data.tags[config.INGEST_RUN_TAG])
    photos = ingest.load(tracking.download(ingest_run, config.INGEST_ARTIFACT))
    predictions = model.predict(pd.DataFrame({"image": list(photos["x_test"])}))
    assert len(predictions) == len(photos["x_test"]) and predictions["digit"].between(0, 9).all()


def test_tune_run_id_of_another_stage_is_refused(mlflow_store):
    with mlflow.start_run() as other:
        mlflow.set_tag(config.STAGE_TAG, "ingest")
    with pytest.raises(PipelineError, match="of stage .ingest., not .tune."):
        train.tuned_hyperparameters(other.info.run_id)
