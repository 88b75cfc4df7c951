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


def first_stop(epochs: int, patience: int, min_epochs: int) -> int | None:
    """The epoch (from 0) at which Keras' own stopper ends a run whose validation accuracy never
    improves: its earliest stop; None when it trains every epoch."""
    stopper = fitting.early_stopping(patience, min_epochs)
    model = tiny_model()
    model.stop_training = False  # what fit sets
    stopper.set_model(model)
    stopper.on_train_begin()
    for epoch in range(epochs):
        stopper.on_epoch_end(epoch, {"val_accuracy": 0.5})
        if model.stop_training:
            return epoch
    return None


def test_can_stop_early_says_when_the_stopper_can_end_a_run_before_its_last_epoch():
    for epochs in range(1, 9):
        for patience in range(4):
            for min_epochs in range(9):
                stop = first_stop(epochs, patience, min_epochs)
                expected = stop is not None and stop < epochs - 1
                assert fitting.can_stop_early(epochs, patience, min_epochs) == expected, (
                    epochs,
                    patience,
                    min_epochs,
                )
    assert not fitting.can_stop_early(config.EPOCHS, config.PATIENCE, config.MIN_EPOCHS)


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


# Backup: a fit that is interrupted and continued ends as if it never was


class Interrupt(keras.callbacks.Callback):
    """Stands in for a kill between two epochs (after the backup of the previous one)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def backed_up_fit(run_id, folder, epochs=30, interrupt_at=None, interval_s=0):
    keras.utils.set_random_seed(0)
    model = fitting.compile_model(tiny_model(), learning_rate=3e-2, steps_per_epoch=2, epochs=epochs)
    stopper = fitting.early_stopping(patience=2, min_epochs=0)
    backup = fitting.Backup(folder, stopper, run_id, interval_s=interval_s)
    logger = fitting.EpochLogger(run_id, 16, backup=backup)
    callbacks = [stopper, logger, backup, *([Interrupt(interrupt_at)] if interrupt_at is not None else [])]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 8, 8, 3)).astype("float32")
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, 16)]
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        initial_epoch=backup.initial_epoch(epochs),
        validation_data=(x[::-1], y),
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    return model, logger.rows, stopper


def test_a_continued_fit_stops_at_the_same_epoch_with_the_same_weights(mlflow_store, tmp_path):
    with mlflow.start_run() as whole:
        model, rows, stopper = backed_up_fit(whole.info.run_id, tmp_path / "whole")
    stopped = stopper.stopped_epoch
    assert 2 <= stopped < 29, "the reference run should stop early, after some waiting"
    # Killed just before its last epoch: only the restored wait counter can stop it there.
    with mlflow.start_run() as run:
        with pytest.raises(KeyboardInterrupt):
            backed_up_fit(run.info.run_id, tmp_path / "split", interrupt_at=stopped)
        assert fitting.Backup.read(tmp_path / "split")["epoch"] == stopped
        again, again_rows, again_stopper = backed_up_fit(run.info.run_id, tmp_path / "split")
    assert [row["epoch"] for row in again_rows] == list(range(stopped + 1))
    assert [row["val_accuracy"] for row in again_rows] == [row["val_accuracy"] for row in rows]
    assert again_stopper.best_epoch == stopper.best_epoch
    assert all(np.array_equal(a, b) for a, b in zip(again.get_weights(), model.get_weights()))
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")]
    assert steps == list(range(stopped + 1))  # each epoch logged once
    assert {path.name for path in (tmp_path / "split").iterdir()} == {
        "state.json",
        f"epoch-{stopped + 1:04d}.weights.h5",
        f"best-{stopper.best_epoch:04d}.npz",
    }


def test_a_finished_backup_trains_nothing_and_logs_what_the_run_lacks(mlflow_store, tmp_path):
    with mlflow.start_run() as first:
        model, rows, _ = backed_up_fit(first.info.run_id, tmp_path / "backup")
    with mlflow.start_run() as second:  # e.g. killed after the last epoch, continued in a new run
        again, again_rows, _ = backed_up_fit(second.info.run_id, tmp_path / "backup")
        logger = fitting.EpochLogger(second.info.run_id, 16, backup=fitting.Backup(tmp_path / "backup"))
        assert logger.log_missing() == len(rows)
        assert logger.log_missing() == 0
    assert again_rows == rows
    assert all(np.array_equal(a, b) for a, b in zip(again.get_weights(), model.get_weights()))
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(second.info.run_id, "loss")]
    assert steps == [row["epoch"] for row in rows]


def test_between_backups_epochs_are_neither_saved_nor_logged_until_the_last(mlflow_store, tmp_path):
    client = mlflow.MlflowClient()
    with mlflow.start_run() as run:
        with pytest.raises(KeyboardInterrupt):
            backed_up_fit(run.info.run_id, tmp_path / "backup", epochs=4, interrupt_at=3, interval_s=3600)
        assert fitting.Backup.read(tmp_path / "backup") is None
        assert client.get_metric_history(run.info.run_id, "val_accuracy") == []
        _, rows, _ = backed_up_fit(run.info.run_id, tmp_path / "backup", epochs=4, interval_s=3600)
    assert [row["epoch"] for row in rows] == [0, 1, 2, 3]
    assert fitting.Backup.read(tmp_path / "backup")["epoch"] == 4  # the last epoch is always saved
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert steps == [0, 1, 2, 3]


def test_a_damaged_backup_is_ignored_and_cleared(tmp_path, caplog):
    folder = tmp_path / "backup"
    folder.mkdir()
    (folder / "state.json").write_text('{"version": 1, "epo')
    (folder / ".tmp-1-epoch-0003.weights.h5").write_bytes(b"half")
    backup = fitting.Backup(folder)
    assert backup.state is None and backup.initial_epoch(10) == 0
    assert "unreadable backup" in caplog.text
    assert list(folder.iterdir()) == []


# weight averaging


def toy_data(count=16):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (count, 8, 8, 3)).astype("float32")
    return x, np.eye(10, dtype="float32")[rng.integers(0, 10, count)]


class WeightsAtEpochEnd(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.model.get_weights())


def test_weight_average_is_the_mean_of_the_last_epochs_weights():
    keras.utils.set_random_seed(0)
    model = fitting.compile_model(tiny_model(), learning_rate=3e-2, steps_per_epoch=2, epochs=5)
    average, seen = fitting.WeightAverage(epochs=5, count=3), WeightsAtEpochEnd()
    model.fit(*toy_data(), batch_size=8, epochs=5, verbose=0, callbacks=[average, seen])
    assert average.complete and average.count == 3 and average.first == 2
    expected = [np.mean(layer, axis=0) for layer in zip(*seen.weights[2:])]
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(average.mean, expected))
    assert not np.allclose(expected[0], seen.weights[-1][0])  # the weights did move


def test_an_early_stop_leaves_the_average_incomplete():
    average = fitting.WeightAverage(epochs=10, count=4)
    average.set_model(tiny_model())
    for epoch in range(8):  # stopped after 8 of 10 epochs: only 2 of the last 4 averaged
        average.on_epoch_end(epoch)
    assert average.count == 2 and not average.complete


def test_batch_norm_statistics_are_reestimated_over_the_data_in_shuffled_batches():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.BatchNormalization(momentum=0.99)(inputs))
    rng = np.random.default_rng(1)
    # Stored class by class, like the training split: two clusters 10 apart, each of variance 4.
    images = np.concatenate([rng.normal(loc, 2.0, (96, 3)) for loc in (-5.0, 5.0)]).astype("float32")
    # 192 images in batches of 40: the last one of 32 weighs less.
    fitting.reestimate_batch_norm(model, images, batch_size=40)
    norm = model.layers[-1]
    assert np.allclose(norm.moving_mean.numpy(), images.mean(axis=0), atol=1e-4)
    # Batches of one cluster would give ~4; the population's variance is ~29.
    assert np.allclose(norm.moving_variance.numpy(), images.var(axis=0), rtol=0.15)
    assert norm.momentum == 0.99


def test_a_backup_keeps_the_running_average_across_a_kill(mlflow_store, tmp_path):
    def fit(run_id, interrupt_at=None):
        keras.utils.set_random_seed(0)
        model = fitting.compile_model(tiny_model(), learning_rate=3e-2, steps_per_epoch=2, epochs=6)
        average = fitting.WeightAverage(epochs=6, count=4)
        backup = fitting.Backup(tmp_path / "backup", None, run_id, average, interval_s=0)
        logger = fitting.EpochLogger(run_id, 16, backup=backup)
        extra = [Interrupt(interrupt_at)] if interrupt_at is not None else []
        model.fit(
            *toy_data(),
            batch_size=8,
            epochs=6,
            initial_epoch=backup.initial_epoch(6),
            shuffle=False,
            verbose=0,
            callbacks=[average, logger, backup, *extra],
        )
        return average

    with mlflow.start_run() as whole:
        reference = fit(whole.info.run_id)
    fitting.Backup(tmp_path / "backup").delete()
    with mlflow.start_run() as run:
        with pytest.raises(KeyboardInterrupt):
            fit(run.info.run_id, interrupt_at=4)  # after 2 of the 4 averaged epochs
        assert fitting.Backup.read(tmp_path / "backup")["average"]["count"] == 2
        continued = fit(run.info.run_id)
    assert continued.complete and continued.count == 4
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(continued.mean, reference.mean))
