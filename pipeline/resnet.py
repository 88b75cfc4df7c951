"""ResNet-50 for 64x64x3 hand-sign photos, in plain Keras 3.

Architecture after He, Zhang, Ren and Sun, "Deep Residual Learning for Image
Recognition" (2015), arXiv:1512.03385: a 7x7 stem, then bottleneck blocks in
four stages (3, 4, 6 and 3 blocks), global average pooling and a dense
classifier; layer names follow the classic Keras ResNet50 code
(``res2a_branch2a``, ``bn2a_branch2a``, ``res2a_branch1``, ...).

Seed bug fixed: the projection shortcut of a convolutional block took the main
path's output; it now projects the block input, as in the paper.

Also: the model rescales 0-255 pixels itself, the final pooling
covers the whole last feature map (any input of at least 32x32 works), and the
softmax runs in float32 so a mixed_bfloat16 policy still gives float32
probabilities.
"""

import numbers

import keras
from keras import layers

BN_EPSILON = 1.001e-5  # as keras.applications.ResNet50
MIN_SIDE = 32  # five stride-2 reductions leave a 1x1 map at 32x32


def _conv_bn(x, filters, kernel_size, name, strides=1, padding="valid", relu=True):
    """Conv2D, BatchNormalization and (optionally) ReLU, named like Keras ResNet50."""
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, name=f"res{name}")(x)
    x = layers.BatchNormalization(axis=3, epsilon=BN_EPSILON, name=f"bn{name}")(x)
    if relu:
        x = layers.ReLU(name=f"res{name}_relu")(x)
    return x


def _main_path(x, kernel_size, filters, base, strides):
    f1, f2, f3 = filters
    x = _conv_bn(x, f1, 1, f"{base}_branch2a", strides=strides)
    x = _conv_bn(x, f2, kernel_size, f"{base}_branch2b", padding="same")
    return _conv_bn(x, f3, 1, f"{base}_branch2c", relu=False)


def identity_block(x, kernel_size, filters, stage, block):
    """Bottleneck block whose shortcut is the block input itself."""
    base = f"{stage}{block}"
    y = _main_path(x, kernel_size, filters, base, strides=1)
    y = layers.Add(name=f"res{base}_add")([y, x])
    return layers.ReLU(name=f"res{base}_out")(y)


def convolutional_block(x, kernel_size, filters, stage, block, strides=2):
    """Bottleneck block with a 1x1 projection shortcut (changes depth and/or size)."""
    base = f"{stage}{block}"
    y = _main_path(x, kernel_size, filters, base, strides=strides)
    # The projection is fed by the block input x, not by the main path y.
    shortcut = _conv_bn(x, filters[2], 1, f"{base}_branch1", strides=strides, relu=False)
    y = layers.Add(name=f"res{base}_add")([y, shortcut])
    return layers.ReLU(name=f"res{base}_out")(y)


def _check_args(input_shape, num_classes):
    """Return input_shape as a tuple of ints; raise ValueError naming a bad argument."""
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
    if (
        len(shape) != 3
        or not all(isinstance(d, numbers.Integral) for d in shape)
        or shape[2] != 3
        or min(shape[:2]) < MIN_SIDE
    ):
        raise ValueError(
            f"input_shape must be (height, width, 3) with integer height and width "
            f">= {MIN_SIDE}; got {input_shape!r}"
        )
    if not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
    return tuple(int(d) for d in shape)


def build_resnet50(input_shape=(64, 64, 3), num_classes=10, bn_momentum=0.99):
    """Build an uncompiled ResNet-50 named 'resnet50'.

    Takes float pixel values 0-255 of shape input_shape (height, width >= 32, 3
    channels) and returns float32 class probabilities of shape (batch, num_classes).
    `bn_momentum` is every batch norm's moving-average momentum (Keras' default 0.99).
    Raises ValueError, naming the parameter, for a bad input_shape or num_classes.
    """
    shape = _check_args(input_shape, num_classes)
    inputs = keras.Input(shape=shape, name="pixels")
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)

    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = layers.Conv2D(64, 7, strides=2, name="conv1")(x)
    x = layers.BatchNormalization(axis=3, epsilon=BN_EPSILON, name="bn_conv1")(x)
    x = layers.ReLU(name="conv1_relu")(x)
    # 'same' gives 16x16 after the stem at 64x64 (as keras.applications does with
    # explicit padding); 'valid' would give 15x15.
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)

    # (stage, filters, identity blocks, strides of the convolutional block)
    for stage, filters, n_identity, strides in (
        (2, (64, 64, 256), 2, 1),
        (3, (128, 128, 512), 3, 2),
        (4, (256, 256, 1024), 5, 2),
        (5, (512, 512, 2048), 2, 2),
    ):
        x = convolutional_block(x, 3, filters, stage, "a", strides=strides)
        for block in "bcdefg"[:n_identity]:
            x = identity_block(x, 3, filters, stage, block)

    # Pool over the whole final map: global average pooling for any input size.
    x = layers.AveragePooling2D(pool_size=tuple(x.shape[1:3]), name="avg_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(int(num_classes), name="fc")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="resnet50")
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = float(bn_momentum)
    return model
