"""A Keras network written directly as an OpenVINO graph, layer by layer, for serving.

OpenVINO's TensorFlow converter traces the network and looks up each of its variables among
all of them: 0.5-2 s for one part of a ResNet-50 on two cores, paid on every model load and
for every bfloat16 candidate `train` tries. Written from the layers, the same graph (the same
answers, to the bit) takes under 0.3 s (benchmarks/README.md). Only the float32 layers of
`resnet.fold_batch_norm`'s network are written; `graph` answers None for anything else, which
is then converted.

A graph to be compiled in bfloat16 computes the convolutions of its raw pixels (whole numbers
0..255, exact in bfloat16) as in float32: the rescaling is folded into each such convolution's
kernel, which is written as two, its bfloat16 rounding and the remainder, whose sum OpenVINO
adds. Rounded once, the folded kernel of a trained ResNet-50's stem moved its probabilities by
up to 0.0067 from float32; split, 0.0035, closer than with the stem in float32 (0.0043), at the
speed of the stem in bfloat16 (benchmarks/README.md).
"""

import ml_dtypes  # numpy's bfloat16, which keras and tensorflow install
import numpy as np
import openvino
import openvino.opset13 as ops
from keras import layers

_NCHW = [0, 3, 1, 2]
_NHWC = [0, 2, 3, 1]
# Keras' "same" pads the extra row and column at the end, as TensorFlow does: OpenVINO's same_upper.
_PADS = {"valid": "valid", "same": "same_upper"}


def graph(network, bfloat16: bool = False) -> openvino.Model | None:
    """`network` (a Keras functional model, or a cut of one, float32 NHWC in and out) as an
    OpenVINO model for any batch size; None when it holds a layer or setting not written here.
    `bfloat16`: the model is for OpenVINO's bfloat16 precision, so the convolutions of its
    rescaled input are split (module docstring)."""
    if len(network.inputs) != 1 or len(network.outputs) != 1:
        return None
    source = network.inputs[0]
    pixels = ops.parameter([-1, *source.shape[1:]], np.float32, name="pixels")
    values = {id(source): _layout(pixels, _NCHW) if len(source.shape) == 4 else pixels}
    unscaled = {}  # a bfloat16 graph's tensors written without the rescaling: the scale they lack
    for layer in network.layers:
        if isinstance(layer, layers.InputLayer):
            continue
        if layer.dtype_policy.compute_dtype != "float32":
            return None
        # A cut of a network calls its layers again on copies of their tensors: of a layer's
        # calls (Keras 3.15 keeps them in a private list; none found leaves the model to the
        # converter), the one on this model's tensors.
        calls = getattr(layer, "_inbound_nodes", ())
        call = next((c for c in calls if all(id(t) in values for t in c.input_tensors)), None)
        if call is None or len(call.output_tensors) != 1:
            return None
        inputs = [values[id(tensor)] for tensor in call.input_tensors]
        if bfloat16 and call.input_tensors[0] is source and _scale_only(layer):
            node, scale = inputs[0], float(layer.get_config()["scale"])  # left for the convolution
        else:
            scales = [unscaled.get(id(tensor)) for tensor in call.input_tensors]
            node, scale = _write_unscaled(layer, inputs, scales)
        if node is None:
            return None
        values[id(call.output_tensors[0])] = node
        if scale is not None:
            unscaled[id(call.output_tensors[0])] = scale
    result = values.get(id(network.outputs[0]))
    if result is None:
        return None
    if id(network.outputs[0]) in unscaled:
        result = ops.multiply(result, _constant(unscaled[id(network.outputs[0])]))
    if len(network.outputs[0].shape) == 4:
        result = _layout(result, _NHWC)
    return openvino.Model([ops.result(result)], [pixels], network.name)


def _layout(node, order):
    return ops.transpose(node, ops.constant(np.array(order, dtype=np.int64)))


def _constant(values) -> openvino.Node:
    return ops.constant(np.asarray(values, dtype=np.float32))


def _write(layer, inputs):
    """The OpenVINO node computing `layer` on `inputs` (NCHW for images); None if not written here."""
    (first, *_) = inputs
    config = layer.get_config()
    if isinstance(layer, layers.Add):
        node = first
        for other in inputs[1:]:
            node = ops.add(node, other)
        return node
    if len(inputs) != 1:
        return None
    if config.get("data_format", "channels_last") != "channels_last":
        return None
    if type(layer) is layers.Conv2D:
        return _conv(layer, config, first)
    if isinstance(layer, layers.Dense):
        if _rank(first) != 2:
            return None
        kernel, *bias = layer.get_weights()
        node = ops.matmul(first, _constant(kernel), False, False)
        if bias:
            node = ops.add(node, _constant(bias[0]))
        return _activation(config["activation"], node)
    if isinstance(layer, layers.ReLU):
        plain = config["max_value"] is None and not config["negative_slope"] and not config["threshold"]
        return ops.relu(first) if plain else None
    if isinstance(layer, layers.Activation):
        return _activation(config["activation"], first)
    if isinstance(layer, layers.Rescaling):
        scale, offset = np.asarray(config["scale"]), np.asarray(config["offset"])
        if scale.ndim or offset.ndim:
            return None
        return ops.add(ops.multiply(first, _constant(scale)), _constant(offset))
    if isinstance(layer, layers.ZeroPadding2D):
        (top, bottom), (left, right) = config["padding"]
        begin, end = np.array([0, 0, top, left]), np.array([0, 0, bottom, right])
        return ops.pad(first, begin, end, "constant", _constant(0.0))
    if isinstance(layer, (layers.MaxPooling2D, layers.AveragePooling2D)):
        return _pool(layer, config, first)
    if isinstance(layer, layers.Flatten):
        return ops.reshape(_layout(first, _NHWC), np.array([0, -1], dtype=np.int64), True)
    return None


def _write_unscaled(layer, inputs, scales):
    """`layer` on `inputs`, some written without the scale of the rescaling (`scales`, None for
    the others): the node, and the scale its output still lacks."""
    if scales == [None] * len(inputs):
        return _write(layer, inputs), None
    if len(inputs) == 1 and isinstance(layer, layers.ZeroPadding2D):
        return _write(layer, inputs), scales[0]  # zeros, scaled or not
    if len(inputs) == 1 and type(layer) is layers.Conv2D:
        return _conv(layer, layer.get_config(), inputs[0], scales[0]), None
    scaled = [node if s is None else ops.multiply(node, _constant(s)) for node, s in zip(inputs, scales)]
    return _write(layer, scaled), None


def _scale_only(layer) -> bool:
    if not isinstance(layer, layers.Rescaling):
        return False
    scale, offset = np.asarray(layer.get_config()["scale"]), np.asarray(layer.get_config()["offset"])
    return scale.ndim == 0 and offset.ndim == 0 and offset == 0


def _conv(layer, config, node, scale=None):
    """`layer` on `node`; with a `scale`, on `node` times `scale`, the kernel split for bfloat16."""
    if config["groups"] != 1 or tuple(config["dilation_rate"]) != (1, 1) or config["padding"] not in _PADS:
        return None
    kernel, *bias = layer.get_weights()
    kernel = np.transpose(kernel, (3, 2, 0, 1))  # HWIO as OIHW
    if scale is None:
        kernels = [kernel]
    else:
        folded = (kernel.astype(np.float64) * scale).astype(np.float32)
        rounded = folded.astype(ml_dtypes.bfloat16).astype(np.float32)
        kernels = [rounded, folded - rounded]
    strides, pad = list(config["strides"]), _PADS[config["padding"]]
    convolutions = [
        ops.convolution(node, _constant(part), strides, [0, 0], [0, 0], [1, 1], pad) for part in kernels
    ]
    node = convolutions[0] if len(convolutions) == 1 else ops.add(*convolutions)
    if bias:
        node = ops.add(node, _constant(bias[0].reshape(1, -1, 1, 1)))
    return _activation(config["activation"], node)


def _pool(layer, config, node):
    if config["padding"] not in _PADS:
        return None
    size, strides = list(config["pool_size"]), list(config["strides"])
    pad = _PADS[config["padding"]]
    if isinstance(layer, layers.MaxPooling2D):
        return ops.max_pool(node, strides, [1, 1], [0, 0], [0, 0], size, "floor", pad).output(0)
    return ops.avg_pool(node, strides, [0, 0], [0, 0], size, True, "floor", pad)


def _activation(name, node):
    if name == "linear":
        return node
    if name == "relu":
        return ops.relu(node)
    if name == "softmax" and _rank(node) == 2:
        return ops.softmax(node, 1)
    return None


def _rank(node) -> int:
    if isinstance(node, openvino.Output):
        return len(node.get_partial_shape())
    return len(node.get_output_partial_shape(0))
