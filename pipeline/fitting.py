"""The training step that `train` and every tuning trial share: precision, optimizer,
schedule, loss, and the callbacks that log each epoch to MLflow."""

import logging
import math
import time
from pathlib import Path

import keras
import mlflow
import numpy as np

from pipeline import config, resnet
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)



def bf16_is_native() -> bool:
    """Whether this machine computes bfloat16 in hardware (AVX512-BF16/AMX, or a GPU)."""
    import tensorflow as tf

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
