"""The training step that `train` and every tuning trial share: precision, optimizer,
schedule, loss, and the callbacks that log each epoch to MLflow."""

import logging
import math
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf

from pipeline import config, resnet
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


def bf16_is_native() -> bool:
    """Whether this machine computes bfloat16 in hardware (AVX512-BF16/AMX, or a GPU)."""
    if tf.config.list_physical_devices("GPU"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def set_precision(precision: str = config.PRECISION) -> str:
    """Set Keras' global dtype policy; `auto` picks mixed_bfloat16 only where it is fast."""
    if precision not in config.PRECISIONS:
        raise PipelineError(f"precision={precision!r}: must be one of {', '.join(config.PRECISIONS)}")
    if precision == "auto":
        precision = "mixed_bfloat16" if bf16_is_native() else "float32"
    keras.mixed_precision.set_global_policy(precision)
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
    """A fresh ResNet50 under the current dtype policy."""
    return resnet.build_resnet50((image_size, image_size, 3), num_classes, bn_momentum=config.BN_MOMENTUM)


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
    )
    return model


def steps(num_images: int, batch_size: int) -> int:
    return max(1, math.ceil(num_images / batch_size))


class EpochLogger(keras.callbacks.Callback):
    """Logs every epoch's metrics, learning rate, epoch time and images/s to one MLflow run."""

    def __init__(self, run_id: str, num_images: int, step_offset: int = 0):
        super().__init__()
        self.run_id = run_id
        self.num_images = num_images
        self.step_offset = step_offset
        self.client = mlflow.MlflowClient()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.started
        metrics = {key: float(value) for key, value in (logs or {}).items() if np.isscalar(value)}
        metrics["learning_rate"] = current_learning_rate(self.model.optimizer)
        metrics["epoch_time_s"] = seconds
        metrics["images_per_s"] = self.num_images / seconds
        timestamp = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[
                mlflow.entities.Metric(key, value, timestamp, epoch + self.step_offset)
                for key, value in metrics.items()
                if math.isfinite(value)
            ],
        )
        log.info(
            "epoch %d: %s",
            epoch + 1,
            ", ".join(f"{key} {value:.4g}" for key, value in metrics.items() if key != "images_per_s"),
        )


def current_learning_rate(optimizer) -> float:
    rate = optimizer.learning_rate
    return float(keras.ops.convert_to_numpy(rate(optimizer.iterations) if callable(rate) else rate))


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
