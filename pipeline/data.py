"""The arrays of an ingest and a onehot run, and the tf.data input pipeline over them."""

import numpy as np
import tensorflow as tf

from pipeline import config, ingest, onehot, tracking
from pipeline.errors import PipelineError

# Batches a pipeline prepares ahead of the model, and its parallel calls: fixed, with tf.data's
# autotuning off. Keras drops the training iterator at the end of every fit, and dropping an
# autotuned one blocked 6-60 s, both cores idle, in about half the fits here (benchmarks/README.md).
AHEAD = 2


def load(onehot_run) -> dict[str, np.ndarray]:
    """Images (uint8) of the ingest run behind `onehot_run`, with its one-hot labels.

    Returns x_train, y_train, x_val, y_val, x_test, y_test (y one-hot float32).
    """
    ingest_run = tracking.find_run("ingest", onehot_run.data.tags.get(config.INGEST_RUN_TAG, ""))
    images = ingest.load(tracking.download(ingest_run, config.INGEST_ARTIFACT))
    labels = onehot.load(tracking.download(onehot_run, config.ONEHOT_ARTIFACT))
    arrays = {}
    for split in config.SPLITS:
        x, y = images[f"x_{split}"], labels[f"y_{split}"]
        if len(x) != len(y) or not np.array_equal(onehot.decode(y), images[f"y_{split}"]):
            raise PipelineError(
                f"onehot run {onehot_run.info.run_id} does not match ingest run {ingest_run.info.run_id} "
                f"({split}: {len(x)} images, {len(y)} labels); re-run onehot"
            )
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    return arrays


def augmenter(seed: int | None = None):
    """Random geometric and photometric changes that keep a digit's meaning (no flips: config)."""
    import keras
    from keras import layers

    amount = config.AUGMENTATION
    return keras.Sequential(
        [
            layers.RandomRotation(amount["rotation"], fill_mode="nearest", seed=seed),
            layers.RandomZoom(amount["zoom"], fill_mode="nearest", seed=seed),
            layers.RandomTranslation(
                amount["translation"], amount["translation"], fill_mode="nearest", seed=seed
            ),
            layers.RandomContrast(amount["contrast"], seed=seed),
            layers.RandomBrightness(amount["brightness"], value_range=(0, 255), seed=seed),
        ],
        name="augment",
    )


def dataset(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    training: bool = False,
    augment: bool = False,
    seed: int = config.SEED,
    endless: bool = False,
    skip: int = 0,
) -> tf.data.Dataset:
    """Batches of (float32 pixels 0-255, labels): uint8 cached in memory, shuffled and
    augmented on the fly for training, prefetched so the model never waits.

    `endless` repeats the epochs (each reshuffled, each ending on its partial batch) for a
    `fit` given `steps_per_epoch` (`fitting.steps`): Keras then keeps one iterator for all the
    epochs. Otherwise it makes the next epoch's iterator at the end of each epoch and drops it,
    unread, at the start of the next; the first step of over a third of the epochs then stalled
    2-7 s with both cores idle (benchmarks/README.md). Validation data stays finite: Keras makes
    a new evaluation iterator for every evaluation, and with an endless one the stall came
    before the evaluations instead.

    `skip` batches are drawn, shuffled and augmented, then dropped: a training continued after
    that many steps gets the batches it would have had uninterrupted.
    """
    data = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    if training:
        data = data.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size)
    if endless:
        data = data.repeat()
    data = data.map(lambda images, labels: (tf.cast(images, tf.float32), labels), AHEAD)
    if training and augment:
        layers = augmenter(seed)
        # One batch at a time: the layers draw from one random state, and batches augmented in
        # parallel took its draws in whatever order they ran, so a seed did not repeat a training
        # (benchmarks/README.md: the step 2% slower, within the machine's noise).
        data = data.map(lambda images, labels: (layers(images, training=True), labels))
    options = tf.data.Options()
    options.autotune.enabled = False
    return data.prefetch(AHEAD).skip(skip).with_options(options)
