"""Property-based tests of pipeline.images: any image, any size, any damage.

Whatever Pillow can make (every common mode, 1 to 3,000 pixels a side, raw pixels
or encoded in seven formats) and whatever damage a file can carry, `preprocess` and
`preprocess_array` give a (64, 64, 3) uint8 array or an ImageError naming the
image; never another exception. An ordinary photo is never refused.
"""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from pipeline import config, images

SIZE = config.IMAGE_SIZE
NAME = "hypo.img"
# The formats Pillow writes each mode to (seen with Pillow 13), among those pipeline.images reads.
FORMATS = {
    "1": ["PNG", "JPEG", "GIF", "TIFF", "BMP"],
    "L": ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"],
    "LA": ["PNG", "WEBP", "TIFF"],
    "P": ["PNG", "GIF", "TIFF", "BMP"],
    "PA": ["WEBP", "TIFF"],
    "RGB": ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"],
    "RGBA": ["PNG", "WEBP", "TIFF"],
    "CMYK": ["JPEG", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],
    "F": ["TIFF"],
    "YCbCr": ["JPEG", "TIFF"],
    "LAB": ["TIFF"],
}
if features.check("avif"):
    for mode in ("L", "RGB", "RGBA"):
        FORMATS[mode].append("AVIF")
ORDINARY_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}  # photos people send; never refused when sized
PROPERTY = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# A silent invalid cast (NaN to uint8, say) would hand the model garbage pixels: make it fail.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


sides = st.one_of(st.integers(1, 16), st.integers(17, 400), st.integers(401, 3_000))


@st.composite
def pictures(draw) -> Image.Image:
    """An image of any mode and size: a random patch (random bytes, so NaN, infinity and
    negatives in float and int modes) on a plain canvas, so that big ones stay cheap to encode."""
    mode = draw(st.sampled_from(sorted(FORMATS)))
    width, height = draw(sides), draw(sides)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    canvas = Image.new(mode, (width, height))
    patch_size = (min(width, 32), min(height, 32))
    length = len(Image.new(mode, patch_size).tobytes())
    canvas.paste(Image.frombytes(mode, patch_size, rng.bytes(length)), (0, 0))
    return canvas


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def check(call, *args) -> np.ndarray | None:
    """The model's array, or None after an ImageError whose message names the image."""
    try:
        array = call(*args, name=NAME)
    except images.ImageError as error:
        message = str(error)
        assert message.startswith(f"{NAME}: ") and len(message) > len(NAME) + 10, message
        return None
    assert isinstance(array, np.ndarray)
    assert array.shape == (SIZE, SIZE, 3) and array.dtype == np.uint8
    return array


def is_ordinary(image: Image.Image) -> bool:
    return image.mode in ORDINARY_MODES and min(image.size) >= config.MIN_PHOTO_SIDE


@PROPERTY
@given(image=pictures(), data=st.data())
def test_any_encoded_image_gives_the_model_input_or_a_named_error(image, data):
    fmt = data.draw(st.sampled_from(FORMATS[image.mode]))
    array = check(images.preprocess, encode(image, fmt))
    if is_ordinary(image):
        assert array is not None, f"a {image.mode} {fmt} of {image.size} was refused"


@PROPERTY
@given(image=pictures())
def test_any_pixel_array_gives_the_model_input_or_a_named_error(image):
    pixels = np.asarray(image)
    array = check(images.preprocess_array, pixels)
    if image.mode in {"L", "P", "RGB", "RGBA"} and min(image.size) >= config.MIN_PHOTO_SIDE:
        assert array is not None, f"{pixels.dtype} pixels of shape {pixels.shape} were refused"


@st.composite
def damaged_files(draw) -> bytes:
    """A small valid file in any format, then truncated, overwritten here and there, or both."""
    mode = draw(st.sampled_from(["L", "P", "RGB", "RGBA"]))
    fmt = draw(st.sampled_from(FORMATS[mode]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    size = (draw(st.integers(8, 40)), draw(st.integers(8, 40)))
    length = len(Image.new(mode, size).tobytes())
    data = bytearray(encode(Image.frombytes(mode, size, rng.bytes(length)), fmt))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.one_of(damaged_files(), st.binary(max_size=2_000)))
def test_damaged_or_random_bytes_never_raise_anything_but_an_image_error(data):
    check(images.preprocess, data)
