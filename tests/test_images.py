"""pipeline.images: the decoding and preprocessing that training and serving share.

Every test works on real encoded bytes made with Pillow in memory; nothing is mocked.
"""

import io
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from conftest import ROOT, bomb_png, photo_bytes
from PIL import Image, features

from pipeline import config, images
from pipeline.errors import PipelineError

SIZE = config.IMAGE_SIZE


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gradient(width: int = 40, height: int = 30) -> np.ndarray:
    """An RGB uint8 picture whose every channel varies, so resizing has work to do."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 7 % 256], axis=-1
    ).astype(np.uint8)


def png_with_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims width x height, with a valid IHDR CRC."""
    data = bytearray(encode(Image.new("RGB", (1, 1), (9, 9, 9))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def assert_model_input(array: np.ndarray, size: int = SIZE) -> None:
    assert isinstance(array, np.ndarray)
    assert array.shape == (size, size, 3)
    assert array.dtype == np.uint8


# ---------------------------------------------------------------- every mode


def test_rgb_jpeg_keeps_its_colour():
    data = encode(Image.new("RGB", (30, 20), (200, 40, 90)), "JPEG", quality=95)
    array = images.preprocess(data)
    assert_model_input(array)
    assert np.abs(array.astype(int) - [200, 40, 90]).max() <= 4


def test_grayscale_l_is_repeated_on_three_channels():
    array = images.preprocess(encode(Image.new("L", (17, 23), 77)))
    assert_model_input(array)
    assert (array == 77).all()


def test_bilevel_mode_1_gives_black_and_white():
    image = Image.new("1", (32, 32), 0)
    image.paste(1, (16, 0, 32, 32))  # right half white
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode == "1"
    assert_model_input(images.preprocess(data))
    decoded = np.asarray(images.decode(data, "bilevel.png"))
    assert decoded.shape == (32, 32, 3)
    assert (decoded[:, :16] == 0).all()
    assert (decoded[:, 16:] == 255).all()


def test_palette_without_transparency_uses_its_colours():
    image = Image.new("P", (20, 20), 0)
    image.putpalette([10, 200, 30] + [0, 0, 0] * 255)
    assert image.mode == "P"
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode == "P"
    array = images.preprocess(data)
    assert_model_input(array)
    assert (array == [10, 200, 30]).all()


def test_palette_with_transparency_makes_the_transparent_index_white():
    image = Image.new("P", (20, 20), 0)
    image.putpalette([10, 200, 30, 50, 60, 70] + [0, 0, 0] * 254)
    image.paste(1, (10, 0, 20, 20))  # right half: index 1
    data = encode(image, transparency=0)  # index 0 (left half) is transparent
    assert "transparency" in Image.open(io.BytesIO(data)).info
    assert_model_input(images.preprocess(data))
    decoded = np.asarray(images.decode(data, "palette.png"))
    assert (decoded[:, :10] == 255).all()
    assert (decoded[:, 10:] == [50, 60, 70]).all()


def test_grayscale_with_transparency_key_makes_those_pixels_white():
    image = Image.new("L", (20, 20), 0)
    image.paste(100, (10, 0, 20, 20))
    data = encode(image, transparency=0)
    assert_model_input(images.preprocess(data))
    decoded = np.asarray(images.decode(data, "keyed.png"))
    assert (decoded[:, :10] == 255).all()
    assert (decoded[:, 10:] == 100).all()


def test_la_alpha_is_composited_on_white():
    pixels = np.zeros((16, 16, 2), np.uint8)
    pixels[..., 0] = 40
    pixels[:, :8, 1] = 0  # left half transparent
    pixels[:, 8:, 1] = 255  # right half opaque
    data = encode(Image.fromarray(pixels, "LA"))
    assert Image.open(io.BytesIO(data)).mode == "LA"
    assert_model_input(images.preprocess(data))
    decoded = np.asarray(images.decode(data, "la.png"))
    assert (decoded[:, :8] == 255).all()
    assert (decoded[:, 8:] == 40).all()


def test_fully_transparent_rgba_becomes_white():
    data = encode(Image.new("RGBA", (25, 25), (0, 0, 0, 0)))
    array = images.preprocess(data)
    assert_model_input(array)
    assert (array == 255).all()


def test_half_transparent_rgba_blends_with_white():
    data = encode(Image.new("RGBA", (25, 25), (0, 0, 0, 128)))
    array = images.preprocess(data)
    assert_model_input(array)
    assert (np.abs(array.astype(int) - 127) <= 1).all()


def test_opaque_rgba_keeps_its_colour():
    array = images.preprocess(encode(Image.new("RGBA", (25, 25), (12, 34, 56, 255))))
    assert (array == [12, 34, 56]).all()


def test_cmyk_jpeg_is_turned_into_rgb():
    data = encode(Image.new("CMYK", (24, 24), (255, 0, 0, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    array = images.preprocess(data)
    assert_model_input(array)
    # Pure cyan ink is red-free, full green and blue.
    assert np.abs(array.astype(int) - [0, 255, 255]).max() <= 4


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (32768, 127.5), (65280, 254), (65535, 255)])
def test_sixteen_bit_png_is_scaled_to_eight_bits(value, expected):
    image = Image.fromarray(np.full((12, 12), value, dtype=np.uint16))
    data = encode(image)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    array = images.preprocess(data)
    assert_model_input(array)
    assert (np.abs(array.astype(float) - expected) <= 0.5).all(), array[0, 0]


def test_sixteen_bit_png_keeps_its_gradient():
    column = np.linspace(0, 65535, 64).astype(np.uint16)
    data = encode(Image.fromarray(np.tile(column, (64, 1))))
    array = images.preprocess(data)
    assert array[0, 0, 0] <= 2
    assert array[0, -1, 0] >= 253
    assert (np.diff(array[32, :, 0].astype(int)) >= -1).all()  # left to right, it only gets brighter


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_tiff_with_nan_or_infinity_is_refused(bad):
    pixels = np.full((16, 16), 100.0, np.float32)
    pixels[3, 4] = bad
    with pytest.raises(images.ImageError) as error:
        images.preprocess(encode(Image.fromarray(pixels, "F"), "TIFF"), name="float.tif")
    assert_image_error(error, "float.tif", "NaN or infinity")


def test_float_tiff_in_range_is_taken_as_grey():
    array = images.preprocess(encode(Image.fromarray(np.full((16, 16), 100.4, np.float32), "F"), "TIFF"))
    assert_model_input(array)
    assert (array == 100).all()


def test_eight_bit_values_stored_as_sixteen_bits_come_back_exactly():
    values = np.arange(256, dtype=np.uint16)
    data = encode(Image.fromarray(np.tile(values * 257, (8, 1))))
    decoded = np.asarray(images.decode(data, "wide.png"))
    assert decoded.shape == (8, 256, 3)
    assert np.array_equal(decoded[0, :, 0], values)


def test_resize_is_pillow_lanczos_of_the_rgb_image():
    """Pinned: a saved model was trained on exactly this resampling."""
    data = encode(Image.fromarray(gradient(97, 61)))
    expected = Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    assert np.array_equal(images.preprocess(data), np.asarray(expected))


@pytest.mark.parametrize("size", [32, 48, 100])
def test_custom_image_size(size):
    array = images.preprocess(photo_bytes(3, 0), image_size=size)
    assert_model_input(array, size)


@pytest.mark.parametrize("size", [(1, 1), (7, 7), (1, 500), (500, 3)])
def test_an_image_too_small_to_be_a_photo_is_refused(size):
    """Upscaled, a 1x1 image is a flat colour: neither a training example nor a question to answer."""
    with pytest.raises(images.ImageError) as error:
        images.preprocess(encode(Image.new("RGB", size, (5, 150, 250))), name="dot.png")
    assert_image_error(error, "dot.png", f"{size[0]}x{size[1]} pixels is too small", "at least 8x8")


def test_the_smallest_photo_is_upscaled():
    array = images.preprocess(encode(Image.new("RGB", (8, 8), (5, 150, 250))))
    assert_model_input(array)
    assert (array == [5, 150, 250]).all()


def test_content_decides_not_the_name():
    data = encode(Image.fromarray(gradient()))
    array = images.preprocess(data, name="IMG_1234.JPG")
    assert_model_input(array)
    assert np.array_equal(array, images.preprocess(data, name="photo.png"))


# ---------------------------------------------------------------- EXIF


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high
    pixels[:, 20:] = 255  # left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif, quality=95)
    assert Image.open(io.BytesIO(data)).size == (40, 20)

    image = images.decode(data, "rotated.jpg")
    assert image.mode == "RGB"
    assert image.size == (20, 40)
    upright = np.asarray(image).astype(int)
    assert upright[:18].mean() < 10  # the left (black) half is now on top
    assert upright[22:].mean() > 245


def test_without_exif_orientation_nothing_turns():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 20:] = 255
    image = images.decode(encode(Image.fromarray(pixels), "JPEG", quality=95), "plain.jpg")
    assert image.size == (40, 20)
    assert np.asarray(image)[:, :18].mean() < 10


# ---------------------------------------------------------------- large JPEGs


def camera_jpeg(width: int, height: int, **options) -> bytes:
    """A JPEG as smooth as a camera's photo at that size: the gradient scaled up."""
    smooth = Image.fromarray(gradient(40, 30)).resize((width, height), Image.Resampling.BICUBIC)
    return encode(smooth, "JPEG", quality=90, **options)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale():
    data = camera_jpeg(1200, 900)
    # 900 // 128 = 7, so the smallest of libjpeg's scales that keeps 128 pixels a side is 1/4.
    assert images.decode(data, "big.jpg", min_side=128).size == (300, 225)
    assert images.decode(data, "big.jpg").size == (1200, 900)


def test_a_jpeg_under_twice_the_side_is_decoded_whole():
    data = camera_jpeg(300, 200)
    assert np.array_equal(np.asarray(images.decode(data, min_side=128)), np.asarray(images.decode(data)))


def test_formats_other_than_jpeg_are_decoded_whole():
    assert images.decode(encode(Image.fromarray(gradient(1000, 800))), min_side=128).size == (1000, 800)


def test_preprocess_reduces_a_phone_photo_close_to_the_whole_decode():
    data = camera_jpeg(4032, 3024)
    whole = images.resize(images.decode(data)).astype(int)
    reduced = images.preprocess(data).astype(int)
    assert not np.array_equal(whole, reduced)
    assert np.abs(whole - reduced).mean() < 1.0


def test_a_reduced_decode_is_upright():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = camera_jpeg(1200, 900, exif=exif)
    assert images.decode(data, "rotated.jpg", min_side=128).size == (225, 300)
    assert images.photo_size(data) == (900, 1200)


def test_photo_size_is_the_stored_size_without_orientation():
    assert images.photo_size(camera_jpeg(1200, 900)) == (1200, 900)
    assert images.photo_size(encode(Image.fromarray(gradient(97, 61)))) == (97, 61)


# ---------------------------------------------------------------- errors


def assert_image_error(error: pytest.ExceptionInfo, name: str, *words: str) -> None:
    assert isinstance(error.value, PipelineError)
    message = str(error.value)
    assert name in message
    for word in words:
        assert word in message, message


def test_image_error_is_a_pipeline_error():
    assert issubclass(images.ImageError, PipelineError)


def test_empty_bytes():
    with pytest.raises(images.ImageError) as error:
        images.preprocess(b"", name="empty.jpg")
    assert_image_error(error, "empty.jpg", "empty")


def test_text_is_not_an_image():
    with pytest.raises(images.ImageError) as error:
        images.preprocess(b"hello", name="notes.jpg")
    assert_image_error(error, "notes.jpg", "not an image")


@pytest.mark.parametrize("fmt", ["DDS", "EPS", "ICO", "PPM", "TGA", "SGI"])
def test_formats_outside_the_list_are_refused_unopened(fmt):
    """Rare formats' decoders are attack surface (fuzzed DDS and SPIDER files raised
    NotImplementedError and AttributeError; EPS runs Ghostscript): they are never opened."""
    data = encode(Image.fromarray(gradient(40, 30)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would open it
    with pytest.raises(images.ImageError) as error:
        images.preprocess(data, name=f"photo.{fmt.lower()}")
    assert_image_error(error, f"photo.{fmt.lower()}", "not an image", ", ".join(config.IMAGE_FORMATS))


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF decoder")
def test_a_malformed_file_whose_decoder_raises_runtime_error_is_an_image_error():
    """Found by fuzzing: libavif raises RuntimeError on a damaged item table; any decoder may
    raise an unusual type, and a skipped file must never become a crash."""
    data = bytearray(encode(Image.new("RGB", (24, 20), (200, 30, 60)), "AVIF"))
    data[81:84] = b"\x00\x00\x00"
    with pytest.raises(images.ImageError) as error:
        images.preprocess(bytes(data), name="damaged.avif")
    assert_image_error(error, "damaged.avif", "broken or truncated")


def test_truncated_jpeg_raises():
    rng = np.random.default_rng(7)
    noisy = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noisy), "JPEG", quality=90)
    assert images.preprocess(data).shape == (SIZE, SIZE, 3)  # the whole file is fine
    with pytest.raises(images.ImageError) as error:
        images.preprocess(data[: len(data) // 2], name="half.jpg")
    assert_image_error(error, "half.jpg", "truncated")


def test_truncated_png_raises():
    data = encode(Image.fromarray(np.random.default_rng(8).integers(0, 256, (128, 128, 3), dtype=np.uint8)))
    with pytest.raises(images.ImageError) as error:
        images.preprocess(data[: len(data) // 2], name="half.png")
    assert_image_error(error, "half.png")


def test_decompression_bomb_is_refused_without_allocating():
    data = png_with_size(20_000, 20_000)
    assert len(data) < 100
    started = time.perf_counter()
    with pytest.raises(images.ImageError) as error:
        images.preprocess(data, name="bomb.png")
    assert time.perf_counter() - started < 1.0
    # Pillow's own guard (2 x Image.MAX_IMAGE_PIXELS) fires first at 400 megapixels.
    assert_image_error(error, "bomb.png", "pixels", "limit")


PEAK_MEMORY = """
import resource, sys
from pathlib import Path
from pipeline import images
try:
    print(images.read(Path(sys.argv[1])).shape)
except images.ImageError as error:
    print(error)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def read_in_a_fresh_process(path) -> tuple[str, int]:
    """What images.read says about `path`, and the peak memory (MiB) of the process that read it."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    message, peak = done.stdout.strip().splitlines()
    return message, int(peak)


@pytest.mark.parametrize(
    ("size", "message"),
    [((20_000, 20_000), "refused as a decompression bomb"), ((8_000, 8_000), "50,000,000-pixel limit")],
)
def test_a_real_oversized_png_is_refused_without_decoding_its_pixels(tmp_path, size, message):
    """Real, valid PNGs of 400 and 64 megapixels (50 KB and 8 KB on disk), not doctored headers:
    decoding either would raise the peak memory by 64 MB or more."""
    small, bomb = tmp_path / "small.png", tmp_path / "bomb.png"
    small.write_bytes(photo_bytes(1, 1, size=100, fmt="PNG"))
    bomb.write_bytes(bomb_png(*size))
    shape, baseline = read_in_a_fresh_process(small)
    assert shape == f"({SIZE}, {SIZE}, 3)"
    refusal, peak = read_in_a_fresh_process(bomb)
    assert refusal.startswith(f"{bomb}: ") and message in refusal
    assert peak - baseline < 32, f"peak {peak} MiB against {baseline} MiB for a small photo"


def test_image_over_the_pipeline_pixel_limit_is_refused():
    # 8000 x 8000 = 64 MP: under Pillow's own limits, over config.MAX_IMAGE_PIXELS.
    assert 8000 * 8000 > config.MAX_IMAGE_PIXELS
    started = time.perf_counter()
    with pytest.raises(images.ImageError) as error:
        images.preprocess(png_with_size(8000, 8000), name="huge.png")
    assert time.perf_counter() - started < 1.0
    assert_image_error(error, "huge.png", "8000x8000", f"{config.MAX_IMAGE_PIXELS:,}-pixel limit")


def test_file_over_the_byte_limit_is_refused(monkeypatch):
    monkeypatch.setattr(config, "MAX_IMAGE_FILE_BYTES", 100)
    data = photo_bytes(1, 1)
    assert len(data) > 100
    with pytest.raises(images.ImageError) as error:
        images.preprocess(data, name="big.jpg")
    assert_image_error(error, "big.jpg", "100-byte limit")


def test_read_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"hello")
    with pytest.raises(images.ImageError) as error:
        images.read(path)
    assert_image_error(error, str(path), "not an image")
    with pytest.raises(images.ImageError) as error:
        images.read(tmp_path / "missing.jpg")
    assert_image_error(error, "missing.jpg", "cannot be read")


def test_read_gives_the_same_array_as_preprocess(tmp_path):
    path = tmp_path / "ok.jpg"
    path.write_bytes(photo_bytes(4, 2))
    assert np.array_equal(images.read(path), images.preprocess(photo_bytes(4, 2)))


# ---------------------------------------------------------------- preprocess_array


@pytest.mark.parametrize("shape", [(10, 10, 3), (64, 64, 3), (200, 120, 3), (8, 8, 3), (31, 47, 3)])
def test_array_rgb_uint8(shape):
    pixels = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    assert_model_input(images.preprocess_array(pixels))


@pytest.mark.parametrize("shape", [(10, 12), (64, 64), (150, 90)])
def test_array_grayscale_2d_and_one_channel(shape):
    pixels = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    flat = images.preprocess_array(pixels)
    assert_model_input(flat)
    assert (flat[..., 0] == flat[..., 1]).all() and (flat[..., 1] == flat[..., 2]).all()
    assert np.array_equal(images.preprocess_array(pixels[..., None]), flat)


@pytest.mark.parametrize("shape", [(10, 10, 4), (64, 64, 4), (90, 33, 4)])
def test_array_rgba_is_composited_on_white(shape):
    pixels = np.zeros(shape, np.uint8)
    array = images.preprocess_array(pixels)  # black, fully transparent
    assert_model_input(array)
    assert (array == 255).all()
    pixels[..., :3] = (20, 30, 40)
    pixels[..., 3] = 255
    assert (images.preprocess_array(pixels) == [20, 30, 40]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint16])
def test_array_numbers_in_0_to_255_are_accepted(dtype):
    pixels = gradient()
    assert np.array_equal(images.preprocess_array(pixels.astype(dtype)), images.preprocess_array(pixels))


def test_array_views_give_the_same_result_as_copies():
    pixels = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    for view in (pixels[:, ::-1], pixels.transpose(1, 0, 2), pixels[::2, ::3], pixels[..., ::-1]):
        assert not view.flags.c_contiguous
        assert np.array_equal(images.preprocess_array(view), images.preprocess_array(view.copy()))
    assert not np.array_equal(images.preprocess_array(pixels[:, ::-1]), images.preprocess_array(pixels))


def test_array_floats_are_rounded():
    pixels = np.full((8, 8, 3), 99.6, dtype=np.float32)
    assert (images.preprocess_array(pixels) == 100).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_array_nan_and_infinity_are_refused(bad):
    pixels = np.full((8, 8, 3), 10.0)
    pixels[3, 3, 1] = bad
    with pytest.raises(images.ImageError) as error:
        images.preprocess_array(pixels, name="frame-7")
    assert_image_error(error, "frame-7", "NaN or infinity")


@pytest.mark.parametrize(("bad", "shown"), [(-1.0, "-1.0..10.0"), (256.0, "10.0..256.0"), (1000, "10..1000")])
def test_array_values_outside_0_to_255_are_refused(bad, shown):
    pixels = np.full((8, 8, 3), 10.0 if isinstance(bad, float) else 10)
    pixels[0, 0, 0] = bad
    with pytest.raises(images.ImageError) as error:
        images.preprocess_array(pixels, name="frame-8")
    assert_image_error(error, "frame-8", "0..255", shown)


@pytest.mark.parametrize("shape", [(1, 8, 8, 3), (8, 8, 5), (8, 8, 2), (8,), ()])
def test_array_wrong_shape_is_refused(shape):
    with pytest.raises(images.ImageError) as error:
        images.preprocess_array(np.zeros(shape, np.uint8), name="frame-9")
    assert_image_error(error, "frame-9", "expected an image of shape", f"got shape {shape}")


def test_array_without_pixels_is_refused():
    with pytest.raises(images.ImageError) as error:
        images.preprocess_array(np.zeros((0, 5, 3), np.uint8), name="frame-0")
    assert_image_error(error, "frame-0", "no pixels", "5x0")


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 1), (7, 64), (64, 2, 4)])
def test_array_too_small_to_be_a_photo_is_refused(shape):
    with pytest.raises(images.ImageError) as error:
        images.preprocess_array(np.zeros(shape, np.uint8), name="frame-dot")
    assert_image_error(error, "frame-dot", f"{shape[1]}x{shape[0]} pixels is too small")


def test_array_over_the_pixel_limit_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(config, "MAX_IMAGE_PIXELS", 99)
    with pytest.raises(images.ImageError) as error:
        images.preprocess_array(np.zeros((10, 10), np.uint8), name="frame-big")
    assert_image_error(error, "frame-big", "10x10", "99-pixel limit")


@pytest.mark.parametrize(
    ("pixels", "dtype_name"),
    [
        (np.full((4, 4, 3), "a"), "<U1"),
        (np.full((4, 4, 3), b"a"), "|S1"),
        (np.full((4, 4, 3), 5, dtype=object), "object"),
        (np.full((4, 4, 3), 5 + 0j), "complex128"),
        (np.ones((4, 4, 3), dtype=bool), "bool"),
    ],
)
def test_array_non_numbers_are_refused(pixels, dtype_name):
    with pytest.raises(images.ImageError) as error:
        images.preprocess_array(pixels, name="frame-s")
    assert_image_error(error, "frame-s", "expected numbers", dtype_name)


@pytest.mark.parametrize(
    ("pixels", "mode"),
    [
        (gradient(40, 30), "RGB"),
        (gradient(17, 90)[..., 0], "L"),
        (np.dstack([gradient(33, 21), (gradient(33, 21)[..., 1] // 2 + 64)]), "RGBA"),
    ],
)
def test_array_and_encoded_bytes_give_the_same_pixels(pixels, mode):
    """Training reads decoded arrays, serving reads bytes: both must see the same input."""
    data = encode(Image.fromarray(pixels, mode))
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    assert np.array_equal(decoded, pixels)  # PNG is lossless
    from_bytes = images.preprocess(data)
    from_array = images.preprocess_array(decoded)
    assert_model_input(from_array)
    assert np.array_equal(from_array, from_bytes)


def test_array_of_a_decoded_jpeg_matches_its_bytes():
    data = photo_bytes(7, 3, size=50)
    decoded = np.asarray(images.decode(data, "seven.jpg"))
    assert np.array_equal(images.preprocess_array(decoded), images.preprocess(data))
