"""The tf.data input pipeline: batches, augmentation, and the hand-over from ingest and onehot."""

import numpy as np

from pipeline import data


def arrays(n=20, size=16):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = np.eye(10, dtype=np.float32)[np.arange(n) % 10]
    return x, y


def test_evaluation_batches_keep_order_and_values():
    x, y = arrays()
    batches = list(data.dataset(x, y, batch_size=8))
    assert [len(b[0]) for b in batches] == [8, 8, 4]
    images = np.concatenate([b[0].numpy() for b in batches])
    assert images.dtype == np.float32 and np.array_equal(images, x.astype(np.float32))


def test_training_batches_are_shuffled_and_complete():
    x, y = arrays()
    first = np.concatenate([b[1].numpy().argmax(1) for b in data.dataset(x, y, 8, training=True, seed=1)])
    assert sorted(first) == sorted(y.argmax(1)) and not np.array_equal(first, y.argmax(1))


def test_augmentation_changes_pixels_within_range_and_keeps_shape():
    x, y = arrays()
    plain, _ = next(iter(data.dataset(x, y, 20, training=True, augment=False, seed=3)))
    augmented, _ = next(iter(data.dataset(x, y, 20, training=True, augment=True, seed=3)))
    augmented = augmented.numpy()
    assert augmented.shape == x.shape and augmented.min() >= 0 and augmented.max() <= 255
    # The same seed shuffles alike, so the difference is the augmentation alone.
    assert np.abs(augmented - plain.numpy()).mean() > 1


def test_no_flips_in_augmentation():
    # A mirrored hand is another sign: flipping would teach the model wrong labels.
    names = [type(layer).__name__ for layer in data.augmenter().layers]
    assert "RandomFlip" not in names and "RandomRotation" in names


def test_endless_batches_repeat_the_epochs_each_reshuffled_and_complete():
    x, y = arrays()
    batches = data.dataset(x, y, 8, training=True, seed=1, endless=True).take(6)
    labels = [b[1].numpy().argmax(1) for b in batches]
    assert [len(b) for b in labels] == [8, 8, 4] * 2  # every epoch ends on its partial batch
    first, second = np.concatenate(labels[:3]), np.concatenate(labels[3:])
    assert sorted(first) == sorted(second) == sorted(y.argmax(1))
    assert not np.array_equal(first, second)


def test_the_same_seed_gives_the_same_augmented_batches():
    # Training with a seed must be repeatable: the augmentation layers draw from one random
    # state, so batches augmented in parallel would take its draws in whatever order they ran.
    x, y = arrays(n=64)

    def batches(seed):
        epochs = data.dataset(x, y, 4, training=True, augment=True, seed=seed, endless=True).take(32)
        return np.stack([images.numpy() for images, _ in epochs])

    first = batches(seed=5)
    assert np.array_equal(first, batches(seed=5))
    assert not np.array_equal(first, batches(seed=6))


def test_skipped_batches_are_drawn_so_the_next_ones_are_those_of_an_unbroken_stream():
    # A continued training skips its done epochs' batches and must then get what it would have
    # had uninterrupted: the same shuffle and the same augmentation draws, over epoch boundaries.
    x, y = arrays(n=40)

    def batches(skip):
        stream = data.dataset(x, y, 8, training=True, augment=True, seed=5, endless=True, skip=skip)
        return [(images.numpy(), labels.numpy()) for images, labels in stream.take(12 - skip)]

    unbroken, continued = batches(skip=0), batches(skip=7)
    assert len(continued) == 5
    for (images, labels), (expected_images, expected_labels) in zip(continued, unbroken[7:], strict=True):
        assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)


def test_pipelines_are_not_autotuned():
    # Keras drops the training iterator at the end of every fit, and dropping an autotuned one
    # blocked 6-60 s with the cores idle (benchmarks/README.md): the depths are fixed instead.
    x, y = arrays()
    for options in ({}, {"training": True, "augment": True, "endless": True}):
        assert data.dataset(x, y, 8, **options).options().autotune.enabled is False
