"""Decoding and preprocessing of one photo, shared by ingest and the served model.

Training and serving call the same `preprocess` so that both see the same pixels.
"""

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline import config
from pipeline.errors import PipelineError

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_SIDEWAYS = {5, 6, 7, 8}  # orientations stored with width and height swapped


class ImageError(PipelineError):
    """One image that cannot be used; ingest skips it, the served model rejects it."""


def decode(data: bytes, name: str = "image", min_side: int = 0) -> Image.Image:
    """Decode encoded image bytes into an upright RGB Pillow image.

    With `min_side`, a JPEG is decoded at the smallest of libjpeg's scales (1/2, 1/4, 1/8)
    that still leaves `min_side` pixels on each side, as `preprocess` does: a phone photo
    is then an eighth of its width and height before it is resized.

    Raises ImageError, naming `name`, for empty or oversized input, content that is
    not an image in one of config.IMAGE_FORMATS, truncated or malformed files, and
    decompression bombs (refused from the header, before any pixel is decoded).
    """
    if not data:
        raise ImageError(f"{name}: the file is empty (0 bytes)")
    if len(data) > config.MAX_IMAGE_FILE_BYTES:
        raise ImageError(
            f"{name}: {len(data):,} bytes is larger than the "
            f"{config.MAX_IMAGE_FILE_BYTES:,}-byte limit for one photo"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF, TIFF tag and palette warnings are noise here
            image = Image.open(io.BytesIO(data), formats=config.IMAGE_FORMATS)
            _check_pixels(image.size, name)
            if min_side:
                image.draft(None, (min_side, min_side))  # a no-op for the formats other than JPEG
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"{name}: refused as a decompression bomb ({error}); downscale it first") from None
    except UnidentifiedImageError:
        formats = ", ".join(config.IMAGE_FORMATS)
        raise ImageError(f"{name}: not an image Pillow can read as one of {formats}") from None
    except Exception as error:  # fuzzing showed Pillow's decoders raise many types on malformed files
        raise ImageError(
            f"{name}: the image data is broken or truncated ({type(error).__name__}: {error})"
        ) from None
    return to_rgb(image, name)


def _check_pixels(size: tuple[int, int], name: str) -> None:
    """Refuse, before any pixel is decoded, an image too large to decode safely or too small to be a photo."""
    width, height = size
    if width * height > config.MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name}: {width}x{height} pixels exceeds the {config.MAX_IMAGE_PIXELS:,}-pixel "
            "limit (a decompression bomb or an unreasonably large photo); downscale it first"
        )
    if width < 1 or height < 1:
        raise ImageError(f"{name}: the image has no pixels ({width}x{height})")
    side = config.MIN_PHOTO_SIDE
    if width < side or height < side:
        raise ImageError(
            f"{name}: {width}x{height} pixels is too small for a photo of a hand (at least {side}x{side})"
        )


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """Any Pillow mode (L, P, RGBA, CMYK, 16-bit, float) as 8-bit RGB.

    Transparent pixels become white, the background of the dataset's photos. Raises
    ImageError naming `name` for float pixels that are NaN or infinite and for a mode
    Pillow cannot convert.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(pixels / 257.0, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        pixels = np.asarray(image)  # float32 as stored: casting a signalling NaN would warn
        if not np.all(np.isfinite(pixels)):
            raise ImageError(f"{name}: the pixel values contain NaN or infinity")
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" or image.mode in ("LA", "PA", "RGBA") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ImageError(f"{name}: image mode {image.mode} cannot be turned into RGB ({error})") from None


def resize(image: Image.Image, image_size: int = config.IMAGE_SIZE) -> np.ndarray:
    """An RGB image as a (image_size, image_size, 3) uint8 array, resized with antialiasing."""
    resized = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def preprocess(data: bytes, image_size: int = config.IMAGE_SIZE, name: str = "image") -> np.ndarray:
    """Encoded image bytes as the (image_size, image_size, 3) uint8 array the model sees."""
    return resize(decode(data, name, min_side=config.DECODE_HEADROOM * image_size), image_size)


def photo_size(data: bytes) -> tuple[int, int]:
    """The upright width and height of a photo that `decode` accepted, read from its header."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data), formats=config.IMAGE_FORMATS) as image:
            width, height = image.size
            sideways = image.getexif().get(ExifTags.Base.Orientation) in _SIDEWAYS
            return (height, width) if sideways else (width, height)


def preprocess_array(
    pixels: np.ndarray, image_size: int = config.IMAGE_SIZE, name: str = "image"
) -> np.ndarray:
    """A decoded photo, (H, W), (H, W, 1|3|4) of uint8 or of floats in 0..255, as the model's array.

    Raises ImageError naming `name` for another shape, non-numbers, NaN or infinity, values
    outside 0..255, and too many or too few pixels (checked before the values are read).
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        raise ImageError(
            f"{name}: expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); "
            f"got shape {pixels.shape}"
        )
    numeric = np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)
    if not numeric:
        raise ImageError(f"{name}: expected numbers, got dtype {pixels.dtype}")
    _check_pixels((pixels.shape[1], pixels.shape[0]), name)
    if pixels.dtype != np.uint8:
        if not np.all(np.isfinite(pixels)):
            raise ImageError(f"{name}: the pixel values contain NaN or infinity")
        if pixels.min() < 0 or pixels.max() > 255:
            raise ImageError(f"{name}: pixel values must lie in 0..255; got {pixels.min()}..{pixels.max()}")
        pixels = np.rint(pixels).astype(np.uint8)
    return resize(to_rgb(Image.fromarray(pixels), name), image_size)


def read(path: Path, image_size: int = config.IMAGE_SIZE) -> np.ndarray:
    """Read and preprocess one image file; ImageError names the file."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageError(f"{path}: cannot be read ({error.strerror or error})") from None
    return preprocess(data, image_size, name=str(path))
