"""The training step that `train` and every tuning trial share: precision, optimizer,
schedule, loss, and the callbacks that log each epoch to MLflow."""

import json
import logging
import math
import shutil
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf

from pipeline import config, files, resnet, tracking
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def bf16_is_native() -> bool:
    """Whether this machine computes bfloat16 in hardware (AVX512-BF16/AMX, or a GPU)."""
    return bool(tf.config.list_physical_devices("GPU")) or tracking.machine()["bfloat16"] != "none"


def set_precision(precision: str = config.PRECISION) -> str:
    """Set Keras' global dtype policy; `auto` picks mixed_bfloat16 only where it is fast."""
    precision = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(precision)
    return precision


def resolve_precision(precision: str) -> str:
    """The policy `precision` stands for on this machine (`auto`: mixed_bfloat16 or float32)."""
    if precision not in config.PRECISIONS:
        raise PipelineError(f"precision={precision!r}: must be one of {', '.join(config.PRECISIONS)}")
    if precision == "auto":
        return "mixed_bfloat16" if bf16_is_native() else "float32"
    return precision


def distribution_strategy(name: str = config.STRATEGY) -> tf.distribute.Strategy:
    """The tf.distribute strategy called `name` (config.STRATEGIES).

    `multiworker` reads TF_CONFIG and waits for every worker it names. Create it before
    TensorFlow runs anything else in the process: it configures TensorFlow's runtime.
    """
    if name not in config.STRATEGIES:
        raise PipelineError(f"strategy={name!r}: must be one of {', '.join(config.STRATEGIES)}")
    if name == "multiworker":
        return MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """TensorFlow's strategy with a `reduce` that Keras 3.15's `fit` can call.

    Keras hands `reduce` a whole (images, labels) batch, and scalar metrics with
    axis=0 (keras-team/keras#20585); this strategy's collective reduce takes one
    value at a time, and no axis for a scalar. Here each value of the structure is
    reduced on its own, across replicas only where it has no axis to reduce along.
    """

    def reduce(self, reduce_op, value, axis):
        reduce_one = super().reduce

        def one(item):
            local = item.values[0] if isinstance(item, tf.distribute.DistributedValues) else item
            return reduce_one(reduce_op, item, axis if local.shape.rank else None)

        return tf.nest.map_structure(one, value)


def new_model(image_size: int, num_classes: int = config.NUM_CLASSES) -> keras.Model:
    """A fresh ResNet50 under the current dtype policy, with config's batch-norm momentum and
    zero-initialised residual blocks."""
    return resnet.build_resnet50(
        (image_size, image_size, 3),
        num_classes,
        bn_momentum=config.BN_MOMENTUM,
        zero_init_residual=config.ZERO_INIT_RESIDUAL,
    )


def compile_model(
    model: keras.Model,
    learning_rate: float,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: int = config.WARMUP_EPOCHS,
    weight_decay: float = config.WEIGHT_DECAY,
    label_smoothing: float = config.LABEL_SMOOTHING,
) -> keras.Model:
    """AdamW (no decay on batch norm and biases), warm-up then cosine decay, smoothed labels."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(steps_per_epoch * warmup_epochs, total - 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate / 100 if warmup else learning_rate,
        decay_steps=total - warmup,
        alpha=0.01,
        warmup_target=learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy"],
        run_eagerly=config.run_eagerly(),
    )
    return model


def steps(num_images: int, batch_size: int) -> int:
    return max(1, math.ceil(num_images / batch_size))


class EpochLogger(keras.callbacks.Callback):
    """Logs every epoch's metrics, learning rate, epoch time and images/s to one MLflow run
    (none when `run_id` is None).

    `rows` collects one dict per epoch ("epoch", the metrics, "timestamp" in ms), starting
    with the epochs of `backup`, if any. With a backup, epochs are logged when the backup
    saves them (when it is due, see `Backup.due`), never before: a kill between the two
    leaves epochs that `log_missing` logs on restart, never one that is logged but trained
    again.
    """

    def __init__(
        self, run_id: str | None, num_images: int, step_offset: int = 0, backup: "Backup | None" = None
    ):
        super().__init__()
        self.run_id = run_id
        self.num_images = num_images
        self.step_offset = step_offset
        self.backup = backup
        self.rows = list(backup.rows) if backup else []
        self.logged = len(self.rows)  # the backup's rows: logged, or `log_missing` logs them
        self.client = mlflow.MlflowClient()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.started
        metrics = {key: float(value) for key, value in (logs or {}).items() if np.isscalar(value)}
        metrics["learning_rate"] = current_learning_rate(self.model.optimizer)
        metrics["epoch_time_s"] = seconds
        metrics["images_per_s"] = self.num_images / seconds
        row = {"epoch": epoch + self.step_offset, **metrics, "timestamp": int(time.time() * 1000)}
        self.rows.append(row)
        last = self.model.stop_training or epoch + 1 >= self.params.get("epochs", 0)
        if self.backup is None or self.backup.due(last):
            if self.backup:
                self.backup.save(self.model, self.rows)
            self.log(self.rows[self.logged :])
            self.logged = len(self.rows)
        log.info(
            "epoch %d: %s",
            epoch + 1,
            ", ".join(f"{key} {value:.4g}" for key, value in metrics.items() if key != "images_per_s"),
        )

    def log(self, rows: list[dict]) -> None:
        if self.run_id is None:  # a multi-worker training's non-chief worker
            return
        self.client.log_batch(
            self.run_id,
            metrics=[
                mlflow.entities.Metric(key, value, row["timestamp"], row["epoch"])
                for row in rows
                for key, value in row.items()
                if key not in ("epoch", "timestamp") and math.isfinite(value)
            ],
        )

    def log_missing(self) -> int:
        """Log the rows whose epoch the run has no val_accuracy for; returns how many."""
        logged = {metric.step for metric in self.client.get_metric_history(self.run_id, "val_accuracy")}
        missing = [row for row in self.rows if row["epoch"] not in logged]
        if missing:
            self.log(missing)
        return len(missing)


class WeightAverage(keras.callbacks.Callback):
    """The running mean of the weights after each of the last `count` epochs of an
    `epochs`-epoch schedule (stochastic weight averaging; config.SWA_EPOCHS).

    `mean` is None until the first of those epochs has ended; `complete` says whether the
    run trained all of them (an early stop leaves the mean incomplete). Place it before
    `EpochLogger`, whose backup saves the mean with the epoch.
    """

    def __init__(self, epochs: int, count: int = config.SWA_EPOCHS):
        super().__init__()
        self.epochs = epochs
        self.first = max(0, epochs - count)
        self.mean: list[np.ndarray] | None = None
        self.count = 0

    def on_epoch_end(self, epoch, logs=None):
        if epoch < self.first:
            return
        self.count += 1
        # A variable at a time: get_weights() would hold a copy of them all (94 MB here) at once.
        if self.mean is None:
            self.mean = [np.array(variable.numpy(), dtype=np.float32) for variable in self.model.weights]
        else:
            for mean, variable in zip(self.mean, self.model.weights):
                mean += (variable.numpy() - mean) / self.count

    @property
    def complete(self) -> bool:
        return self.mean is not None and self.count == self.epochs - self.first


def reestimate_batch_norm(
    model: keras.Model, images: np.ndarray, batch_size: int, seed: int = config.SEED
) -> None:
    """Set every batch norm's moving mean and variance to their average over `images` in
    shuffled batches, as the weights now are: averaged weights were never trained with the
    statistics their batch norms hold. Shuffled, because batches of one class (the training
    split is stored class by class) hold only that class's variance."""
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [norm.momentum for norm in norms]
    totals = [[np.zeros(norm.moving_mean.shape), np.zeros(norm.moving_variance.shape)] for norm in norms]
    order = np.random.default_rng(seed).permutation(len(images))
    try:
        # Momentum 0: a forward pass leaves its batch's statistics in the moving ones, to be
        # read. Set before the trace, which takes it as a constant.
        for norm in norms:
            norm.momentum = 0.0
        # Traced: a graph frees each activation after its last use. Called eagerly, Keras held a
        # whole forward pass's (250 MiB more at batch 128: train's peak memory; benchmarks/README.md).
        spec = tf.TensorSpec((None, *images.shape[1:]), tf.float32)
        forward = tf.function(lambda batch: model(batch, training=True), input_signature=[spec])
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[order[start : start + batch_size]], dtype=np.float32)
            forward(batch)
            for (mean, variance), norm in zip(totals, norms):
                mean += len(batch) * norm.moving_mean.numpy()
                variance += len(batch) * norm.moving_variance.numpy()
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    for (mean, variance), norm in zip(totals, norms):
        norm.moving_mean.assign(mean / len(images))
        norm.moving_variance.assign(variance / len(images))


class Backup(keras.callbacks.Callback):
    """The training state in `folder`, so that a killed run continues.

    `EpochLogger` calls `save` at the end of an epoch when the backup is `due`: the last
    epoch, or `interval_s` seconds (config.backup_interval_s()) after the previous save or
    the start. A save writes the weights with the optimizer's state (its step counter drives
    the learning-rate schedule), the early stopper's state with its best weights, and every
    epoch's metrics: for the ResNet-50 here 284 MB (473 MB with new best and averaged
    weights) and 1.2-2 s, which after every epoch cost a minute of the default training's
    14. A kill loses the epochs since the last save. `state.json` names the files of the
    last complete save and is replaced atomically after them, so a kill at any moment
    leaves the previous save intact.
    Placed after the early stopper in the callback list, it restores everything at the
    start of `fit` (Keras' own BackupAndRestore overwrites its files in place and forgets
    the early stopper's state). With `average` (a WeightAverage), its running mean is
    saved and restored too. Pass `initial_epoch()` to `fit`. Not for tf.distribute strategies.
    """

    STATE = "state.json"
    VERSION = 2

    def __init__(
        self,
        folder: Path,
        stopper: keras.callbacks.EarlyStopping | None = None,
        run_id: str = "",
        average: WeightAverage | None = None,
        interval_s: float | None = None,
    ):
        super().__init__()
        self.folder = Path(folder)
        self.stopper = stopper
        self.average = average
        self.run_id = run_id
        self.interval_s = config.backup_interval_s() if interval_s is None else interval_s
        self.saved_at = time.monotonic()
        self.state = self.read(self.folder)
        if self.folder.is_dir():
            self._remove_unreferenced()  # what a killed save left half-written

    @classmethod
    def read(cls, folder: Path) -> dict | None:
        """The last saved state in `folder`, or None when there is none or it is unusable."""
        try:
            state = json.loads((Path(folder) / cls.STATE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("ignoring the unreadable backup in %s (%s); training starts over", folder, error)
            return None
        if state.get("version") != cls.VERSION or not (Path(folder) / state["weights"]).is_file():
            log.warning("ignoring the incomplete backup in %s; training starts over", folder)
            return None
        return state

    @property
    def rows(self) -> list[dict]:
        return self.state["rows"] if self.state else []

    def initial_epoch(self, epochs: int) -> int:
        """The epoch to start from: the first one not yet done, or `epochs` when it stopped early."""
        if not self.state:
            return 0
        return epochs if self.state["stopped"] else min(self.state["epoch"], epochs)

    def due(self, last_epoch: bool) -> bool:
        """Whether the epoch that just ended is to be saved."""
        return last_epoch or time.monotonic() - self.saved_at >= self.interval_s

    def on_train_begin(self, logs=None):
        self.saved_at = time.monotonic()
        if not self.state:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(self.folder / self.state["weights"])
        if self.stopper is not None and self.state["stopper"]:
            stopper = self.state["stopper"]
            for name in ("wait", "stopped_epoch", "best", "best_epoch"):
                setattr(self.stopper, name, stopper[name])
            if stopper["best_weights"]:
                self.stopper.best_weights = _load_arrays(self.folder / stopper["best_weights"])
        average = self.state["average"]
        if self.average is not None and average:
            self.average.mean = _load_arrays(self.folder / average["file"])
            self.average.count = average["count"]
        log.info("continuing from the backup in %s after epoch %d", self.folder, self.state["epoch"])

    def save(self, model: keras.Model, rows: list[dict]) -> None:
        """Save the state after the epoch of rows[-1]; then drop the previous save's files."""
        epoch = rows[-1]["epoch"] + 1
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = f"epoch-{epoch:04d}.weights.h5"
        with files.replacing(self.folder / weights) as temporary:
            model.save_weights(temporary)
        state = {
            "version": self.VERSION,
            "run_id": self.run_id,
            "epoch": epoch,
            "stopped": bool(model.stop_training),
            "weights": weights,
            "stopper": self._save_stopper(),
            "average": self._save_average(epoch),
            "rows": rows,
        }
        files.write_text(self.folder / self.STATE, json.dumps(state, indent=1))
        self.state = state
        self.saved_at = time.monotonic()
        self._remove_unreferenced()

    def _save_stopper(self) -> dict | None:
        if self.stopper is None:
            return None
        stopper = self.stopper
        best_weights = None
        if stopper.best_weights is not None:
            best_weights = f"best-{stopper.best_epoch:04d}.npz"
            if not (self.folder / best_weights).exists():  # unchanged since that epoch's save
                with files.replacing(self.folder / best_weights) as temporary:
                    np.savez(temporary, *stopper.best_weights)
        return {
            "wait": int(stopper.wait),
            "stopped_epoch": int(stopper.stopped_epoch),
            "best": None if stopper.best is None else float(stopper.best),
            "best_epoch": int(stopper.best_epoch),
            "best_weights": best_weights,
        }

    def _save_average(self, epoch: int) -> dict | None:
        if self.average is None or self.average.mean is None:
            return None
        name = f"average-{epoch:04d}.npz"
        with files.replacing(self.folder / name) as temporary:
            np.savez(temporary, *self.average.mean)
        return {"file": name, "count": self.average.count}

    def _remove_unreferenced(self) -> None:
        keep = set()
        if self.state:
            keep = {
                self.STATE,
                self.state["weights"],
                (self.state["stopper"] or {}).get("best_weights"),
                (self.state["average"] or {}).get("file"),
            }
        for path in self.folder.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def delete(self) -> None:
        """Remove the folder: the run has finished and its results are logged."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def current_learning_rate(optimizer) -> float:
    rate = optimizer.learning_rate
    return float(keras.ops.convert_to_numpy(rate(optimizer.iterations) if callable(rate) else rate))


def recipe() -> list:
    """The settings of the training step that are not parameters (for keys of searches and backups)."""
    return [
        config.WARMUP_EPOCHS,
        config.WEIGHT_DECAY,
        config.LABEL_SMOOTHING,
        config.BN_MOMENTUM,
        config.AUGMENTATION,
        config.SWA_EPOCHS,
    ]


def training_key(
    onehot_run_id: str,
    learning_rate: float,
    batch_size: int,
    epochs: int,
    seed: int,
    augment: bool,
    precision: str,
) -> dict:
    """What makes two trainings the same one, epoch for epoch: the data, the settings, the
    recipe and the code. A tuning trial with the same key trained the first epochs of it."""
    return {
        "onehot_run_id": onehot_run_id,
        "learning_rate": float(learning_rate),
        "batch_size": int(batch_size),
        "epochs": int(epochs),
        "seed": int(seed),
        "augment": bool(augment),
        "precision": resolve_precision(precision),
        "recipe": json.loads(json.dumps(recipe())),
        "commit": tracking.code_version()[config.COMMIT_TAG],
    }


def can_stop_early(epochs: int, patience: int, min_epochs: int) -> bool:
    """Whether `early_stopping(patience, min_epochs)` can end an `epochs`-epoch run before its
    last epoch. Its earliest stop: the epoch `min_epochs` (counted from 0) sets the best, and
    `patience` epochs without a better one (at least 1) stop the run."""
    return min_epochs + max(patience, 1) < epochs - 1


def early_stopping(patience: int, min_epochs: int) -> keras.callbacks.EarlyStopping:
    """Stop on validation accuracy, never before `min_epochs`, restoring the best weights."""
    return keras.callbacks.EarlyStopping(
        monitor="val_accuracy",
        mode="max",
        patience=patience,
        start_from_epoch=min_epochs,
        restore_best_weights=True,
        verbose=1,
    )
