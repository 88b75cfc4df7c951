"""The served model: raw hand-sign photos in, a digit and ten probabilities out.

`log_model` stores a trained Keras model as an MLflow pyfunc (`SignDigitsModel`)
that decodes and preprocesses every photo with `pipeline.images`, exactly as
ingest did for training: callers send photos of any size, never 64x64 tensors.

Python, `model = mlflow.pyfunc.load_model("models:/sign-digits-resnet50@champion")`,
then `model.predict(...)` with:

- a DataFrame with one column (any name) of photos, one per row: `bytes` of an
  encoded JPEG, PNG, ... file; a `str` with those bytes in base64 (standard or
  URL-safe alphabet, padding optional, or a `data:image/jpeg;base64,...` URL); a
  numpy array of decoded pixels, (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of
  uint8 or numbers in 0..255, any size; or the same pixels as nested lists;
- a list of bytes or base64 strings, or a dict `{"image": [...]}` of photos.

Pixel arrays go in a DataFrame column: MLflow's schema check refuses a plain
list of arrays or a 4-D array, and spreads a list of nested lists over columns.
`SignDigitsModel.predict` called directly also takes those lists and a 4-D
(N, H, W, C) array. MLflow keeps only the first column of a wider DataFrame.

The answer has one row per photo, in order: `digit` (int64), `confidence`
(float64, the largest probability) and `p0` ... `p9` (float64 probabilities).
For a photo the network is unsure of (confidence below `config.TEST_TIME_GATE`)
the probabilities are the mean over the photo and four copies of it shifted by a
few pixels (test-time augmentation, `config.TEST_TIME_SHIFT`): 5 forward passes
for that photo, one for the others; models whose validation loss it did not lower
answer every photo alone (`choose_test_time_shift`). `model.predict(photos,
params={"test_time_augmentation": False})` gives the network's answer on every
photo alone.

The network runs on OpenVINO (`ServedNetwork`), compiled once when the model loads.

HTTP, `mlflow models serve -m models:/sign-digits-resnet50@champion`: POST /invocations with
`Content-Type: application/json` and one of

    {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ["<base64>"]]}}
    {"dataframe_records": [{"image": "<base64>"}, {"image": [[[0, 0, 0], ...], ...]}]}
    {"inputs": ["<base64>", "<base64>"]}
    {"instances": ["<base64>", "<base64>"]}

and optionally `"params": {"test_time_augmentation": false}` beside the data.

Send pixels (nested lists of rows of [r, g, b] or of grey values) in the two
dataframe shapes: under "inputs" MLflow splits each photo into its rows. The
answer is 200 with
`{"predictions": [{"digit": 3, "confidence": 0.98, "p0": 0.001, ..., "p9": 0.002}, ...]}`.
MLflow prefixes an error message with "Failed to predict data '<the input>'"; an
empty "inputs" list is refused by MLflow's own schema check ("... 0 inputs").
A bad photo, an empty batch or more than `config.MAX_PREDICT_BATCH` photos
answer 400 with `{"error_code": "INVALID_PARAMETER_VALUE", "message": ...}`, the
message naming the photo and what to send ("image 3: not valid base64; send ...").
"""

import base64
import binascii
import io
import logging
import os
import re
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import keras
import mlflow
import numpy as np
import openvino
import pandas as pd
import tensorflow as tf
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType, ParamSchema, ParamSpec
from PIL import Image

from pipeline import (
    config,
    images,
    openvino_graph,
    resnet,  # registers the layers the saved model names
)
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

KERAS_ARTIFACT = "keras_model"
KERAS_FILE = "model.keras"
TEST_TIME_SHIFT_KEY = "test_time_shift"  # in the logged model's model_config
TEST_TIME_GATE_KEY = "test_time_gate"  # in the logged model's model_config
BFLOAT16_STAGES_KEY = "bfloat16_stages"  # in the logged model's model_config
TEST_TIME_AUGMENTATION = "test_time_augmentation"  # the predict parameter
CROSS_ENTROPY_EPSILON = 1e-7  # Keras' clip for cross-entropy
PACKAGE_DIR = Path(__file__).resolve().parent
# What loading the served model imports; pinned to the versions it was logged with.
SERVING_PACKAGES = ("mlflow", "tensorflow", "keras", "openvino", "numpy", "pandas", "pillow")

_LOW_PRECISION = {"mixed_bfloat16", "mixed_float16", "bfloat16", "float16"}
_DATA_URL = re.compile(r"data:[\w.+-]*/?[\w.+-]*(;[\w.+-]+=[\w.+-]+)*;base64,", re.IGNORECASE)
_BASE64 = re.compile(r"[A-Za-z0-9+/\-_]*={0,2}")
_SEND_FILE = "send a JPEG or PNG file as bytes, or as a base64 string"
_SEND_PIXELS = (
    "send each photo's pixels as one (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array of uint8 or "
    "numbers in 0..255, one photo per cell of a one-column DataFrame "
    "(over HTTP: dataframe_split or dataframe_records)"
)


class SignDigitsModel(mlflow.pyfunc.PythonModel):
    """Photos of hand signs in, digits and class probabilities out (see the module docstring)."""

    def load_context(self, context) -> None:
        self.keras_file = context.artifacts[KERAS_ARTIFACT]  # the trained model, as logged
        from pipeline import fitting

        # Models logged before mixed precision serving name no stages: they answer in float32, as
        # does every model on a machine without native bfloat16 (emulated, it would be slower).
        stages = tuple((context.model_config or {}).get(BFLOAT16_STAGES_KEY, ()))
        self.bfloat16_stages = stages if stages and fitting.bf16_is_native() else ()
        trained = keras.saving.load_model(self.keras_file, compile=False)
        _, height, width, channels = trained.input_shape
        if height != width or channels != 3:
            raise PipelineError(f"the served model needs square RGB input; got {trained.input_shape}")
        self.image_size = int(height)
        self.num_classes = int(trained.output_shape[-1])
        # Models logged before test-time augmentation have no model_config: they answer as before,
        # and those logged before its gate shift every photo (gate None).
        self.test_time_shift = int((context.model_config or {}).get(TEST_TIME_SHIFT_KEY, 0))
        self.test_time_gate = (context.model_config or {}).get(TEST_TIME_GATE_KEY)
        self.network = ServedNetwork(inference_model(trained), self.bfloat16_stages)
        log.info(
            "loaded a %dx%d model with %d classes; test-time shift %d pixels below confidence %s; "
            "bfloat16 stages %s",
            self.image_size,
            self.image_size,
            self.num_classes,
            self.test_time_shift,
            self.test_time_gate,
            list(self.bfloat16_stages) or "none",
        )

    def shifted_photos(self, confidence: np.ndarray) -> np.ndarray:
        """Which photos, by their one-view `confidence`, the default answer averages with shifted
        copies: none when the shift is off, every one for a model logged before the gate."""
        return unsure_photos(confidence, self.test_time_shift, self.test_time_gate)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """One row per photo: digit, confidence, p0..p{k-1}; MlflowException for bad input.

        Through MLflow `model_input` is always a DataFrame (its schema check makes one);
        called directly it may also be a list, a dict or a 4-D array (see `photos`).
        `params`: {"test_time_augmentation": False} answers from the photo alone.
        """
        shift = self.test_time_shift if test_time_augmentation(params) else 0
        pixels = build_batch(model_input, self.image_size)

        def infer(chunk):
            return mean_over_views(self.network, chunk, shift, self.test_time_gate)

        return predictions_frame(in_chunks(infer, pixels))


def test_time_augmentation(params: dict | None) -> bool:
    """The predict parameter `test_time_augmentation` (default true); MlflowException unless a bool."""
    unknown = set(params or {}) - {TEST_TIME_AUGMENTATION}
    if unknown:
        raise invalid(f"unknown parameters {sorted(unknown)}; the one parameter is {TEST_TIME_AUGMENTATION}")
    value = (params or {}).get(TEST_TIME_AUGMENTATION, True)
    if not isinstance(value, (bool, np.bool_)):
        raise invalid(f"{TEST_TIME_AUGMENTATION} must be true or false; got {value!r}")
    return bool(value)


def shifted_copies(pixels: np.ndarray, shift: int) -> np.ndarray:
    """A batch (N, H, W, C)'s copies shifted by `shift` pixels down, right, up and left (what
    leaves one side comes back on the other), as one (4N, H, W, C) batch, copy by copy."""
    return np.concatenate([np.roll(pixels, offset, axis) for offset in (shift, -shift) for axis in (1, 2)])


def unsure_photos(confidence: np.ndarray, shift: int, gate: float | None) -> np.ndarray:
    """The mask of the photos whose one-view `confidence` test-time augmentation shifts: none when
    `shift` is 0, all when `gate` is None, else those below `gate`."""
    confidence = np.asarray(confidence)
    if not shift:
        return np.zeros(len(confidence), dtype=bool)
    if gate is None:
        return np.ones(len(confidence), dtype=bool)
    return confidence < gate


def mean_over_views(predict, pixels: np.ndarray, shift: int, gate: float | None = None) -> np.ndarray:
    """`predict` (a float32 batch in, probabilities out) on `pixels`, as float64; for the photos
    `unsure_photos` picks, the mean over the photo and its `shifted_copies` (more calls, of at most
    config.PREDICT_CHUNK_SIZE copies: 256 at once took about 500 MiB more in a probe)."""
    probabilities = np.asarray(predict(pixels), dtype=np.float64)
    unsure = unsure_photos(probabilities.max(axis=1), shift, gate)
    if unsure.any():
        copies = in_chunks(predict, shifted_copies(pixels[unsure], shift))
        by_copy = copies.reshape(4, int(unsure.sum()), -1)
        probabilities[unsure] = (probabilities[unsure] + by_copy.sum(axis=0)) / 5
    return probabilities


def inference_model(model: keras.Model) -> keras.Model:
    """The float32 model to serve: a ResNet-50's batch norms folded into its convolutions; other
    models as they are."""
    if not any(layer.name == "bn_conv1" for layer in model.layers):
        return model
    policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("float32")
        return resnet.fold_batch_norm(model)
    finally:
        keras.mixed_precision.set_global_policy(policy)


class ServedNetwork:
    """A float32 Keras `network`'s probabilities for a float32 batch of pixels, compiled once by
    OpenVINO for any batch size: in float32, but for the ResNet stages `bfloat16_stages` (a run of
    consecutive stages of `inference_model`'s ResNet-50), cut out and compiled in bfloat16.

    OpenVINO, not TensorFlow: its CPU kernels keep each convolution's weights laid out once, which
    TensorFlow's redo on every call (benchmarks/README.md). The weights are copied: later changes to
    `network` do not reach it. One call at a time: an infer request is not thread-safe, and one call
    already uses every core."""

    def __init__(self, network: keras.Model, bfloat16_stages=()):
        core = openvino.Core()
        self.precisions = []  # "f32" or "bf16", part by part
        self.models = []  # the compiled parts, in order
        for part, precision in precision_parts(network, bfloat16_stages):
            graph = openvino_graph.graph(part, bfloat16=precision == "bf16")
            if graph is None:
                graph = converted(part)
            hints = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
            self.models.append(core.compile_model(graph, "CPU", hints))
            self.precisions.append(precision)
        self._requests = [model.create_infer_request() for model in self.models]
        self._lock = threading.Lock()

    def __call__(self, pixels) -> np.ndarray:
        with self._lock:
            values = np.asarray(pixels, dtype=np.float32)
            for request in self._requests:
                values = request.infer([values])[0]
            return np.array(values)  # a copy: the request writes its next answer over its output

    def runtime_precisions(self) -> list[set[str]]:
        """The precisions OpenVINO computes each part's convolutions in, part by part."""
        return [
            {
                node.get_rt_info()["runtimePrecision"].astype(str)
                for node in model.get_runtime_model().get_ops()
                if node.get_rt_info()["layerType"].astype(str) == "Convolution"
            }
            for model in self.models
        ]


def precision_parts(network: keras.Model, bfloat16_stages=()) -> list[tuple[keras.Model, str]]:
    """`network` as consecutive sub-models with the precision each computes in: the whole in "f32"
    without `bfloat16_stages`; else cut where those stages begin and end, the middle in "bf16".
    With the stem (stage 1) the "bf16" part starts at the network's input, not at its rescaling:
    `openvino_graph` folds the rescaling into the first convolution and splits its kernel, and the
    pixels, whole numbers 0..255, are exact in bfloat16, where rescaled ones rounded to it moved a
    trained model's probabilities by up to 0.012 (benchmarks/README.md). ValueError for stages
    with a gap between them."""
    stages = sorted(set(bfloat16_stages))
    if stages and stages != list(range(stages[0], stages[-1] + 1)):
        raise ValueError(f"bfloat16 stages must follow each other, like 3,4,5; got {stages}")
    inside = [index for index, layer in enumerate(network.layers) if resnet.stage(layer.name) in stages]
    if not inside:
        return [(network, "f32")]
    end = network.layers[inside[-1]].output
    if 1 in stages:
        cuts = [(network.input, end, "bf16")]
    else:
        start = network.layers[inside[0] - 1].output
        cuts = [(network.input, start, "f32"), (start, end, "bf16")]
    cuts.append((end, network.output, "f32"))
    return [(keras.Model(first, last), precision) for first, last, precision in cuts]


class BFloat16Choice(NamedTuple):
    """The ResNet stages a model is served with in bfloat16 (none: float32 throughout), the largest
    gap to float32 measured for them, and that served network, compiled."""

    stages: tuple[int, ...]
    gap: float
    network: "ServedNetwork"


def choose_bfloat16_stages(model: keras.Model, photos: np.ndarray) -> BFloat16Choice:
    """The first of config.SERVING_BFLOAT16_CANDIDATES (fastest first) whose served network, on
    `photos` (uint8, the model's input size: the validation split), gives the float32 Keras
    network's digits and probabilities within config.SERVING_MAX_PROBABILITY_GAP of it, with that
    largest gap; no stages and a gap of 0.0 when none does, the model is not a ResNet-50 or this
    processor computes no bfloat16 natively (OpenVINO would compute float32 instead, and the gaps
    measured would hold nothing for a machine that has it: served in float32 everywhere)."""
    from pipeline import fitting

    float32 = inference_model(model)
    if float32 is model or not fitting.bf16_is_native():
        return BFloat16Choice((), 0.0, ServedNetwork(float32))
    expected = forward(float32, photos)
    for stages in config.SERVING_BFLOAT16_CANDIDATES:
        network = ServedNetwork(float32, stages)
        answers = in_chunks(network, photos)
        gap = float(np.abs(answers - expected).max())
        same_digits = np.array_equal(answers.argmax(axis=1), expected.argmax(axis=1))
        log.info(
            "stages %s in bfloat16: probabilities up to %.4f from float32 on %d photos%s",
            list(stages),
            gap,
            len(photos),
            "" if same_digits else ", other digits",
        )
        if same_digits and gap <= config.SERVING_MAX_PROBABILITY_GAP:
            return BFloat16Choice(tuple(stages), gap, network)
        del network
    return BFloat16Choice((), 0.0, ServedNetwork(float32))


class ViewScores(NamedTuple):
    """How a network does on labelled photos from each photo alone and shifting the unsure ones:
    the photos it gets wrong, and the mean cross-entropy against the labels."""

    errors_single: int
    errors_shifted: int
    loss_single: float
    loss_shifted: float


def choose_test_time_shift(
    single, photos: np.ndarray, labels: np.ndarray, mode: str = "auto"
) -> tuple[int, ViewScores]:
    """config.TEST_TIME_SHIFT when the served network `single` (a float32 batch in, probabilities
    out: `choose_bfloat16_stages`' network), shifting the photos below config.TEST_TIME_GATE, has a
    lower cross-entropy on `photos` (uint8, the validation split) than from every photo alone, else
    0 (off); `mode` "on" or "off" decides instead of that rule. With the scores of each. `labels`:
    digits, or one-hot rows.

    The loss, not the count of errors: on 280 photos a model gets 1-4 wrong, and one photo either
    way decided a default run's served model against the shifts (validation 1 -> 2 wrong, loss
    0.117 -> 0.114), which then got 6 test photos wrong alone against 2 shifted (README, "Measured here")."""
    labels = labels.argmax(axis=1) if labels.ndim == 2 else labels
    scores = view_scores(single, photos, labels)
    serve = scores.loss_shifted < scores.loss_single if mode == "auto" else mode == "on"
    return (config.TEST_TIME_SHIFT if serve else 0), scores


def view_scores(single, photos: np.ndarray, labels: np.ndarray) -> ViewScores:
    """The ViewScores of `single` (a float32 batch in, probabilities out) on `photos` with their
    digits `labels`."""

    def shifted(pixels):
        return mean_over_views(single, pixels, config.TEST_TIME_SHIFT, config.TEST_TIME_GATE)

    probabilities = [in_chunks(infer, photos) for infer in (single, shifted)]
    errors = [int((p.argmax(axis=1) != labels).sum()) for p in probabilities]
    return ViewScores(*errors, *(cross_entropy(p, labels) for p in probabilities))


def cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The mean cross-entropy of class probabilities (N, K) against the digits `labels`, each
    probability clipped to CROSS_ENTROPY_EPSILON as Keras clips it."""
    right = probabilities[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(right, CROSS_ENTROPY_EPSILON, 1.0))))


def compiled(network: keras.Model):
    """`network`'s probabilities for a float32 batch of pixels, as one graph traced once for any
    batch size (not once per call or per shape)."""
    spec = tf.TensorSpec((None, *network.input_shape[1:]), tf.float32)
    return tf.function(lambda pixels: network(pixels, training=False), input_signature=[spec])


def converted(network: keras.Model) -> openvino.Model:
    """`network` as an OpenVINO model for any batch size, by OpenVINO's TensorFlow converter (for
    the networks `openvino_graph` does not write)."""
    return openvino.convert_model(compiled(network), input=[(-1, *network.input_shape[1:])])


def forward(model: keras.Model, photos: np.ndarray) -> np.ndarray:
    """The Keras `model`'s own probabilities for uint8 photos, computed by TensorFlow."""
    return in_chunks(compiled(model), photos)


def in_chunks(infer, pixels: np.ndarray) -> np.ndarray:
    """`infer` (a float32 batch in, probabilities out) over `pixels`, config.PREDICT_CHUNK_SIZE at a
    time, as float64."""
    size = config.PREDICT_CHUNK_SIZE
    chunks = [infer(pixels[start : start + size].astype(np.float32)) for start in range(0, len(pixels), size)]
    return np.concatenate([np.asarray(chunk, dtype=np.float64) for chunk in chunks])


def predictions_frame(probabilities: np.ndarray) -> pd.DataFrame:
    """Class probabilities (N, K) as the served columns digit, confidence, p0..p{K-1}."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    frame = pd.DataFrame(
        {
            "digit": probabilities.argmax(axis=1).astype(np.int64),
            "confidence": probabilities.max(axis=1),
        }
    )
    for k in range(probabilities.shape[1]):
        frame[f"p{k}"] = probabilities[:, k]
    return frame


def invalid(message: str) -> MlflowException:
    """The exception MLflow's scoring server answers with HTTP 400, the message and no traceback."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


# Input


def build_batch(model_input, image_size: int = config.IMAGE_SIZE) -> np.ndarray:
    """Every photo of `model_input` as the (N, image_size, image_size, 3) uint8 batch the model sees.

    Raises MlflowException(INVALID_PARAMETER_VALUE) naming the photo for a bad one,
    and for an empty batch or one of more than config.MAX_PREDICT_BATCH photos
    (checked before anything is decoded).
    """
    items = photos(model_input)
    if not items:
        raise invalid("the batch is empty; send at least one image")
    if len(items) > config.MAX_PREDICT_BATCH:
        raise invalid(
            f"{len(items):,} images in one request; send at most {config.MAX_PREDICT_BATCH:,} "
            "and split larger batches into several requests"
        )
    # Pillow's decoders let go of the GIL: two threads decode 64 phone photos in 0.54 s, one in 0.98.
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1)) as pool:
        names = [f"image {index}" for index in range(len(items))]
        return np.stack(list(pool.map(preprocess_item, items, [image_size] * len(items), names)))


def photos(model_input) -> list:
    """The photos of any accepted input form, as a list of items in request order."""
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            raise invalid(
                f"expected a DataFrame with one column of images; got {model_input.shape[1]} columns "
                f"{list(model_input.columns)[:5]}"
            )
        return _expand(model_input.iloc[:, 0].tolist())
    if isinstance(model_input, dict):
        if len(model_input) != 1:
            raise invalid(
                f'expected a dict with one key, {{"image": [...]}}; got keys {list(model_input)[:5]}'
            )
        model_input = next(iter(model_input.values()))
    if isinstance(model_input, pd.Series):
        return _expand(model_input.tolist())
    if isinstance(model_input, np.ndarray) and model_input.ndim in (1, 4):
        return list(model_input)
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    raise invalid(
        f"cannot read images from {type(model_input).__name__}"
        f"{f' of shape {model_input.shape}' if isinstance(model_input, np.ndarray) else ''}; send a "
        "DataFrame with one column of images, a list of images or a 4-D (N, H, W, C) array"
    )


def _expand(cells: list) -> list:
    """MLflow turns {"image": [str, str]} into one row holding the list: unpack that row."""
    if len(cells) == 1 and isinstance(cells[0], (list, tuple)) and cells[0]:
        if all(isinstance(cell, (str, bytes)) for cell in cells[0]):
            return list(cells[0])
    return cells


def preprocess_item(item, image_size: int, name: str) -> np.ndarray:
    """One photo (bytes, base64 str, pixel array or nested lists) as the model's uint8 array."""
    try:
        if isinstance(item, (bytes, bytearray, memoryview)):
            return images.preprocess(bytes(item), image_size, name)
        if isinstance(item, str):
            return images.preprocess(from_base64(item, name), image_size, name)
        if isinstance(item, (np.ndarray, list, tuple)):
            return images.preprocess_array(_pixels(item, name), image_size, name)
    except images.ImageError as error:
        hint = _SEND_PIXELS if isinstance(item, (np.ndarray, list, tuple)) else _SEND_FILE
        raise invalid(f"{error}; {hint}") from None
    if item is None or (isinstance(item, float) and np.isnan(item)):
        raise invalid(f"{name}: missing (None or NaN); {_SEND_FILE}, or {_SEND_PIXELS}")
    raise invalid(f"{name}: cannot read an image from {type(item).__name__}; {_SEND_FILE}, or {_SEND_PIXELS}")


def _pixels(item, name: str) -> np.ndarray:
    """Nested lists (as JSON carries pixels) as one numeric array; ragged or tiny ones are refused.

    A photo with a side under config.MIN_PHOTO_SIDE is refused as well: MLflow spreads the
    rows of pixels sent as a plain list (or under "inputs") over DataFrame columns
    and keeps the first, so what arrives is one row of pixels, not the photo.
    """
    try:
        pixels = np.asarray(item.tolist() if isinstance(item, np.ndarray) and item.dtype == object else item)
    except (ValueError, TypeError):
        raise images.ImageError(f"{name}: the rows of pixels differ in length") from None
    if pixels.dtype == object:
        raise images.ImageError(f"{name}: the pixels are not all numbers")
    if pixels.ndim in (2, 3) and min(pixels.shape[:2]) < config.MIN_PHOTO_SIDE:
        height, width = pixels.shape[:2]
        raise images.ImageError(
            f"{name}: {height}x{width} pixels is too small for a photo of a hand (at least "
            f"{config.MIN_PHOTO_SIDE}x{config.MIN_PHOTO_SIDE})"
        )
    return pixels


def from_base64(text: str, name: str = "image") -> bytes:
    """The bytes in a base64 string: standard or URL-safe alphabet, padding optional, data URLs too."""
    text = text.strip()
    url = _DATA_URL.match(text)
    if url:
        text = text[url.end() :]
    elif text[:5].lower() == "data:":
        raise images.ImageError(f"{name}: a data URL must be base64, like data:image/jpeg;base64,...")
    text = "".join(text.split())
    if not text:
        raise images.ImageError(f"{name}: the string is empty")
    if len(text) > 4 * -(-config.MAX_IMAGE_FILE_BYTES // 3):  # refused before it is decoded
        raise images.ImageError(
            f"{name}: {len(text):,} base64 characters hold more than the "
            f"{config.MAX_IMAGE_FILE_BYTES:,}-byte limit for one photo"
        )
    if not _BASE64.fullmatch(text) or len(text.rstrip("=")) % 4 == 1:
        raise images.ImageError(f"{name}: not valid base64")
    text = text.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise images.ImageError(f"{name}: not valid base64") from None


# Logging


def log_model(
    keras_model: keras.Model,
    registered_model_name: str | None = config.MODEL_NAME,
    example_image: bytes | None = None,
    bfloat16_stages=(),
    test_time_shift: int = config.TEST_TIME_SHIFT,
) -> ModelInfo:
    """Log `keras_model` as a pyfunc `SignDigitsModel` (float32, no optimizer) in the active run,
    answering with test-time augmentation (`test_time_shift`, 0: off; see `choose_test_time_shift`)
    for the photos it is unsure of (config.TEST_TIME_GATE) unless a request turns it off,
    its ResNet stages `bfloat16_stages` computed in bfloat16 (see `choose_bfloat16_stages`).

    Registers a new version of `registered_model_name` unless it is None.
    `example_image` (encoded JPEG/PNG bytes) becomes the input example; by default a
    mid-grey PNG. Raises PipelineError when no MLflow run is active.
    """
    if mlflow.active_run() is None:
        raise PipelineError("serving.log_model needs an active MLflow run (mlflow.start_run())")
    model = keras_model if is_float32_uncompiled(keras_model) else float32_copy(keras_model)
    example = pd.DataFrame({"image": [base64.b64encode(example_image or grey_png()).decode("ascii")]})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / KERAS_FILE
        model.save(path)
        log.info("saved the float32 model (%.1f MB) to log it", path.stat().st_size / 1e6)
        return mlflow.pyfunc.log_model(
            name=config.LOGGED_MODEL_NAME,
            python_model=SignDigitsModel(),
            artifacts={KERAS_ARTIFACT: str(path)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature(int(model.output_shape[-1])),
            input_example=example,
            pip_requirements=requirements(),
            model_config={
                TEST_TIME_SHIFT_KEY: int(test_time_shift),
                TEST_TIME_GATE_KEY: config.TEST_TIME_GATE,
                BFLOAT16_STAGES_KEY: [int(stage) for stage in bfloat16_stages],
            },
            registered_model_name=registered_model_name,
        )


def float32_copy(keras_model: keras.Model) -> keras.Model:
    """An uncompiled float32 copy (rebuilt from its config with float32 policies, same weights)."""
    model_config = _float32_config(keras.saving.serialize_keras_object(keras_model))
    # A compiled model's config recompiles the copy, and Keras then builds an optimizer for it:
    # Adam's two moments would triple the served file and add to the memory that logging takes.
    model_config.pop("compile_config", None)
    copy = keras.saving.deserialize_keras_object(model_config)
    copy.set_weights(keras_model.get_weights())
    return copy


def is_float32_uncompiled(keras_model: keras.Model) -> bool:
    """Whether `keras_model` already is what `float32_copy` makes: every layer float32, no optimizer."""
    policies = {layer.dtype_policy.name for layer in keras_model.layers}
    return not keras_model.compiled and policies == {"float32"}


def _float32_config(node):
    if isinstance(node, list):
        return [_float32_config(value) for value in node]
    if not isinstance(node, dict):
        return node
    node = {key: _float32_config(value) for key, value in node.items()}
    if node.get("class_name") == "DTypePolicy" and node["config"].get("name") in _LOW_PRECISION:
        node["config"] = {**node["config"], "name": "float32"}
    if isinstance(node.get("dtype"), str) and node["dtype"] in _LOW_PRECISION:
        node["dtype"] = "float32"
    return node


def signature(num_classes: int = config.NUM_CLASSES) -> ModelSignature:
    """One unnamed column of any type in; digit, confidence and p0..p{k-1} out; one parameter,
    `test_time_augmentation` (default true)."""
    outputs = [ColSpec("long", "digit"), ColSpec("double", "confidence")]
    outputs += [ColSpec("double", f"p{k}") for k in range(num_classes)]
    params = ParamSchema([ParamSpec(TEST_TIME_AUGMENTATION, "boolean", True)])
    return ModelSignature(inputs=Schema([ColSpec(AnyType())]), outputs=Schema(outputs), params=params)


def requirements() -> list[str]:
    """Pinned pip requirements of the served model: what loading and predicting import."""
    return [f"{package}=={metadata.version(package)}" for package in SERVING_PACKAGES]


def grey_png(size: int = 64) -> bytes:
    """A small mid-grey PNG, the default input example."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()
