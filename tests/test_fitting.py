"""The shared training step: precision, schedule, weight decay, callbacks."""

import keras
import mlflow
import numpy as np
import pytest

from pipeline import config, fitting
from pipeline.errors import PipelineError


@pytest.fixture
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def tiny_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(2, 3)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))


def test_precision_auto_follows_the_hardware(float32_policy):
    chosen = fitting.set_precision("auto")
    assert chosen == ("mixed_bfloat16" if fitting.bf16_is_native() else "float32")
    assert keras.mixed_precision.global_policy().name == chosen
    assert fitting.set_precision("float32") == "float32"
    with pytest.raises(PipelineError, match="precision='fp8'"):
        fitting.set_precision("fp8")


def test_schedule_warms_up_then_decays():
    model = fitting.compile_model(
        tiny_model(), learning_rate=1e-3, steps_per_epoch=10, epochs=20, warmup_epochs=2
    )
    schedule = model.optimizer._learning_rate
    rates = [float(schedule(step)) for step in (0, 10, 20, 110, 199)]
    assert rates[0] == pytest.approx(1e-5, rel=1e-3)
    assert rates[0] < rates[1] < rates[2] == pytest.approx(1e-3, rel=1e-3)
    assert rates[2] > rates[3] > rates[4] > 0


def test_no_weight_decay_on_batch_norm_and_biases():
    model = fitting.compile_model(tiny_model(), learning_rate=1e-3, steps_per_epoch=1, epochs=1)
    optimizer = model.optimizer
    decayed = {v.path for v in model.trainable_variables if optimizer._use_weight_decay(v)}
    assert decayed and all(v.endswith("kernel") for v in decayed)


def test_loss_uses_label_smoothing():
    model = fitting.compile_model(tiny_model(), learning_rate=1e-3, steps_per_epoch=1, epochs=1)
    assert model.loss.get_config()["label_smoothing"] == config.LABEL_SMOOTHING


def test_early_stopping_waits_for_min_epochs_and_restores_the_best():
    stopper = fitting.early_stopping(patience=4, min_epochs=15)
    assert (stopper.monitor, stopper.patience, stopper.start_from_epoch) == ("val_accuracy", 4, 15)
    assert stopper.restore_best_weights


def test_epoch_logger_logs_every_epoch_to_the_run(mlflow_store):
    model = fitting.compile_model(tiny_model(), learning_rate=1e-3, steps_per_epoch=2, epochs=3)
    x = np.random.default_rng(0).uniform(0, 255, (16, 8, 8, 3)).astype("float32")
    y = np.eye(10, dtype="float32")[np.arange(16) % 10]
    with mlflow.start_run() as run:
        model.fit(
            x,
            y,
            batch_size=8,
            epochs=3,
            validation_data=(x, y),
            verbose=0,
            callbacks=[fitting.EpochLogger(run.info.run_id, len(x))],
        )
    client = mlflow.MlflowClient()
    for key in ("loss", "accuracy", "val_accuracy", "learning_rate", "epoch_time_s", "images_per_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1, 2], key
    assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, "images_per_s"))
