"""ResNet-50 for 64x64x3 hand-sign photos, in plain Keras 3.

Architecture after He, Zhang, Ren and Sun, "Deep Residual Learning for Image
Recognition" (2015), arXiv:1512.03385: a 7x7 stem, then bottleneck blocks in
four stages (3, 4, 6 and 3 blocks), global average pooling and a dense
classifier; layer names follow the classic Keras ResNet50 code
(``res2a_branch2a``, ``bn2a_branch2a``, ``res2a_branch1``, ...).

Seed bug fixed: the projection shortcut of a convolutional block took the main
path's output; it now projects the block input, as in the paper.

Also: the model rescales 0-255 pixels itself, the final pooling
covers the whole last feature map (any input of at least 32x32 works), the
softmax runs in float32 so a mixed_bfloat16 policy still gives float32
probabilities, and each batch norm runs as one fused TensorFlow kernel
(`FusedBatchNormalization`).
"""

import numbers
import re

import keras
import numpy as np
from keras import layers

BN_EPSILON = 1.001e-5  # as keras.applications.ResNet50
MIN_SIDE = 32  # five stride-2 reductions leave a 1x1 map at 32x32
_BLOCK_LAYER = re.compile(r"(?:res|bn)([2-5])[a-z]_")  # res4b_branch2a, bn4b_branch2a, res4b_add


@keras.saving.register_keras_serializable(package="pipeline")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization, computed by TensorFlow's fused kernel (FusedBatchNormV3).

    Keras 3 normalizes with separate ops (a cast to float32, the moments, the scaling,
    a cast back), forward and backward; oneDNN's fused kernel does it in one pass over
    the activations, bfloat16 in and out: on this 2-core CPU the ResNet-50 training step
    at batch 64 runs about 1.5x as fast (benchmarks/README.md). Same weights, same
    moving averages, same outputs and gradients to rounding. Anything but a 4-D
    channels-last input with scale and center (a mask, renorm, synchronized
    statistics, another backend) takes Keras' path.
    """

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        is_training = bool(training) and self.trainable
        output, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs,
            self.gamma.value,
            self.beta.value,
            mean=None if is_training else self.moving_mean.value,
            variance=None if is_training else self.moving_variance.value,
            epsilon=self.epsilon,
            is_training=is_training,
        )
        if is_training:
            # The kernel hands back the unbiased batch variance; Keras averages the biased one.
            count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), variance.dtype)
            variance = variance * (count - 1) / tf.maximum(count, 1.0)
            for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                moving.assign(moving * self.momentum + batch * (1.0 - self.momentum))
        return output

    def _fusable(self, inputs, mask) -> bool:
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and len(inputs.shape) == 4
            and self.axis in (3, -1)
            and self.scale
            and self.center
            and not getattr(self, "renorm", False)
            and not self.synchronized
        )


def _conv_bn(
    x, filters, kernel_size, name, strides=1, padding="valid", relu=True, batch_norm=True, gamma="ones"
):
    """Conv2D, BatchNormalization (its scale initialised to `gamma`) and (optionally) ReLU, named
    like Keras ResNet50."""
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, name=f"res{name}")(x)
    if batch_norm:
        x = FusedBatchNormalization(axis=3, epsilon=BN_EPSILON, gamma_initializer=gamma, name=f"bn{name}")(x)
    if relu:
        x = layers.ReLU(name=f"res{name}_relu")(x)
    return x


def _main_path(x, kernel_size, filters, base, strides, batch_norm, zero_init):
    f1, f2, f3 = filters
    x = _conv_bn(x, f1, 1, f"{base}_branch2a", strides=strides, batch_norm=batch_norm)
    x = _conv_bn(x, f2, kernel_size, f"{base}_branch2b", padding="same", batch_norm=batch_norm)
    last_gamma = "zeros" if zero_init else "ones"
    return _conv_bn(x, f3, 1, f"{base}_branch2c", relu=False, batch_norm=batch_norm, gamma=last_gamma)


def identity_block(x, kernel_size, filters, stage, block, batch_norm=True, zero_init=False):
    """Bottleneck block whose shortcut is the block input itself; `zero_init` starts the main
    path's last batch norm at scale 0, so that the block starts as its shortcut."""
    base = f"{stage}{block}"
    y = _main_path(x, kernel_size, filters, base, strides=1, batch_norm=batch_norm, zero_init=zero_init)
    y = layers.Add(name=f"res{base}_add")([y, x])
    return layers.ReLU(name=f"res{base}_out")(y)


def convolutional_block(x, kernel_size, filters, stage, block, strides=2, batch_norm=True, zero_init=False):
    """Bottleneck block with a 1x1 projection shortcut (changes depth and/or size); `zero_init` as
    for `identity_block` (the projection's batch norm keeps scale 1)."""
    base = f"{stage}{block}"
    y = _main_path(x, kernel_size, filters, base, strides=strides, batch_norm=batch_norm, zero_init=zero_init)
    # The projection is fed by the block input x, not by the main path y.
    shortcut = _conv_bn(
        x, filters[2], 1, f"{base}_branch1", strides=strides, relu=False, batch_norm=batch_norm
    )
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


def build_resnet50(
    input_shape=(64, 64, 3), num_classes=10, bn_momentum=0.99, batch_norm=True, zero_init_residual=False
):
    """Build an uncompiled ResNet-50 named 'resnet50'.

    Takes float pixel values 0-255 of shape input_shape (height, width >= 32, 3
    channels) and returns float32 class probabilities of shape (batch, num_classes).
    `bn_momentum` is every batch norm's moving-average momentum (Keras' default 0.99).
    `zero_init_residual` initialises the scale of each block's last batch norm (`bn*_branch2c`)
    to 0 instead of 1, so that every block starts as its shortcut (Goyal et al. 2017,
    arXiv:1706.02677, section 5.1).
    `batch_norm=False` leaves the batch norms out: the skeleton `fold_batch_norm` fills.
    Raises ValueError, naming the parameter, for a bad input_shape or num_classes.
    """
    shape = _check_args(input_shape, num_classes)
    inputs = keras.Input(shape=shape, name="pixels")
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)

    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = layers.Conv2D(64, 7, strides=2, name="conv1")(x)
    if batch_norm:
        x = FusedBatchNormalization(axis=3, epsilon=BN_EPSILON, name="bn_conv1")(x)
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
        options = {"batch_norm": batch_norm, "zero_init": zero_init_residual}
        x = convolutional_block(x, 3, filters, stage, "a", strides=strides, **options)
        for block in "bcdefg"[:n_identity]:
            x = identity_block(x, 3, filters, stage, block, **options)

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


def stage(layer_name: str) -> int:
    """The stage of a layer of `build_resnet50` by its name: 1 for the stem (conv1 to pool1),
    2-5 for the bottleneck blocks, 0 for the rest (input, rescaling, pooling, classifier)."""
    block = _BLOCK_LAYER.match(layer_name)
    if block:
        return int(block.group(1))
    return 1 if layer_name.startswith(("conv1", "bn_conv1", "pool1")) else 0


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """The same function as a trained `model` from `build_resnet50`, for inference only: each
    batch norm's moving statistics and scale folded into the convolution before it.

    A batch norm at inference is an affine map per channel, so conv+BN is one conv with
    scaled kernels and a shifted bias: 53 fewer layers to run. Built under the current
    dtype policy. Raises ValueError when `model` is not such a ResNet-50.
    """
    if model.name != "resnet50" or not any(layer.name == "bn_conv1" for layer in model.layers):
        raise ValueError(f"fold_batch_norm needs a model from build_resnet50; got {model.name!r}")
    folded = build_resnet50(model.input_shape[1:], model.output_shape[-1], batch_norm=False)
    for layer in folded.layers:
        if not layer.weights:
            continue
        source = model.get_layer(layer.name)
        if isinstance(layer, layers.Conv2D):
            norm = model.get_layer("bn_conv1" if layer.name == "conv1" else "bn" + layer.name[3:])
            kernel, bias = (np.asarray(w, dtype=np.float64) for w in source.get_weights())
            gamma, beta, mean, variance = (np.asarray(w, dtype=np.float64) for w in norm.get_weights())
            scale = gamma / np.sqrt(variance + norm.epsilon)
            layer.set_weights([kernel * scale, (bias - mean) * scale + beta])
        else:
            layer.set_weights(source.get_weights())
    return folded
