"""Shared fixtures: an MLflow store under tmp_path, small generated photos, the real archive."""

import base64
import contextlib
import io
import os
import socket
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Training steps run eagerly here and in every process a test starts: tracing ResNet50's train
# graph costs 20-90 s per process on 2 cores, more than a test's few steps on tiny photos. The
# traced path, the one users run, is tested where a test asks for the `traced` fixture.
os.environ.setdefault(config.EAGER_ENV, "1")

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE_ENV = "SIGN_DIGITS_ARCHIVE"
DEFAULT_ARCHIVE = ROOT.parent / "shared" / "datasets" / "sign-language-digits.zip"
# The slowest files, slowest first (seconds summed over their tests on 980b2b1, AMD EPYC: 290,
# 247, 230, 188, 169, 169, 124; the next, test_benchmarks.py, 69). `make test` hands files to its
# two processes in collection order (--no-loadscope-reorder), so a process's last file is a short
# one; xdist's own order, the files with the most tests first, left the 3-test files that take
# 4-5 minutes to the end, with the other process idle for up to a minute and a half.
SLOWEST_FILES = (
    "test_resume.py",
    "test_distributed.py",
    "test_train.py",
    "test_serving.py",
    "test_main.py",
    "test_tune.py",
    "test_tracking_server.py",
)


def pytest_collection_modifyitems(config, items):
    missing = [name for name in SLOWEST_FILES if not (ROOT / "tests" / name).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py: SLOWEST_FILES names {missing}; no such test file")
    rank = {name: position for position, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def isolated_mlflow_environment(monkeypatch):
    """MLflow 3's set_experiment exports MLFLOW_EXPERIMENT_ID; undo that after every test."""
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


@contextlib.contextmanager
def sqlite_store(root: Path, **env: str):
    """Track to a SQLite store under `root`, working in `root`, with `env` set, until the block
    ends; yields the tracking URI. For module-scoped stores (a fresh store per test costs seconds)."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for name, value in {"MLFLOW_TRACKING_URI": uri, **env}.items():
            patch.setenv(name, value)
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(previous)


@pytest.fixture
def traced(monkeypatch):
    """Training steps traced into a graph, as users run them."""
    monkeypatch.setenv(config.EAGER_ENV, "0")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite tracking store with artifacts under tmp_path (never a file: URI)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    monkeypatch.setenv("SIGN_DIGITS_DATA_DIR", str(tmp_path / "input_dataset"))
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("tests")  # forget the experiment id a previous test's store had
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def photo_bytes(label: int, index: int, size: int = 24, fmt: str = "JPEG") -> bytes:
    """A small distinct photo: a digit-dependent colour with per-image noise."""
    rng = np.random.default_rng(label * 1000 + index)
    base = np.array([25 * label, 255 - 20 * label, (80 * label) % 256], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A real, valid PNG of width x height black pixels (1 bit each) that compresses to tens of KB.

    Written row by row so that making it never holds the pixels in memory.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter type 0, then the packed bits
    compressor = zlib.compressobj(9)
    rows_per_block = 256
    data = []
    for start in range(0, height, rows_per_block):
        data.append(compressor.compress(row * min(rows_per_block, height - start)))
    data.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(data)) + chunk(b"IEND", b"")
    )


def make_tree(root: Path, per_class: int = 4, layout: str = "archive") -> Path:
    """Write a dataset in one of ingest's layouts; returns the folder to pass as source.

    archive: root/Sign-Language-Digits-Dataset-x/Dataset/<digit>/IMG_<n>.JPG
    folders: root/<digit>/<n>.jpg
    flat:    root/<digit>_<n>.JPG
    """
    for label in range(10):
        for index in range(per_class):
            data = photo_bytes(label, index)
            if layout == "archive":
                path = (
                    root
                    / "Sign-Language-Digits-Dataset-x"
                    / "Dataset"
                    / str(label)
                    / f"IMG_{9 - label}{index}.JPG"
                )
            elif layout == "folders":
                path = root / str(label) / f"{index}.jpg"
            else:
                path = root / f"{label}_{index}.JPG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


def make_zip(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(folder).as_posix())
    return archive


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    return make_tree(tmp_path / "photos")


@pytest.fixture
def dataset_zip(tmp_path, dataset_dir) -> Path:
    return make_zip(dataset_dir, tmp_path / "photos.zip")


@pytest.fixture(scope="session")
def real_archive() -> Path:
    """The real Sign Language Digits archive ($SIGN_DIGITS_ARCHIVE, default ../shared)."""
    path = Path(os.environ.get(ARCHIVE_ENV) or DEFAULT_ARCHIVE)
    if not path.is_file():
        pytest.skip(f"real archive not found at {path}; set {ARCHIVE_ENV} to run real-data tests")
    return path


def tiny_classifier():
    """A small, fast stand-in for ResNet50 with the same input and output (64x64x3 -> 10)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((64, 64, 3))
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Conv2D(4, 3, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10, activation="softmax")(x))


def shift_sensitive_classifier():
    """A tiny model whose answer depends on where things are in the photo (no global pooling)."""
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((64, 64, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(2, 4, strides=4, activation="relu")(x)
    x = keras.layers.Dense(10, kernel_initializer=keras.initializers.RandomNormal(stddev=0.5))(
        keras.layers.Flatten()(x)
    )
    return keras.Model(inputs, keras.layers.Softmax()(x))


def expected_probabilities(
    model, batch: np.ndarray, shift: int = config.TEST_TIME_SHIFT, gate: float | None = config.TEST_TIME_GATE
) -> np.ndarray:
    """The Keras model's probabilities for the batch; for the photos whose confidence is below `gate`
    (all when None) averaged with those for their copies rolled `shift` pixels down, right, up and
    left (test-time augmentation; shift 0: every photo alone)."""
    batch = batch.astype(np.float32)
    single = np.asarray(model(batch, training=False), dtype=np.float64)
    if not shift:
        return single
    views = [batch, *(np.roll(batch, offset, axis) for offset in (shift, -shift) for axis in (1, 2))]
    averaged = np.mean([np.asarray(model(view, training=False), dtype=np.float64) for view in views], axis=0)
    unsure = np.ones(len(batch), bool) if gate is None else single.max(axis=1) < gate
    return np.where(unsure[:, None], averaged, single)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
