"""Shared fixtures: an MLflow store under tmp_path, small generated photos, the real archive."""

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE_ENV = "SIGN_DIGITS_ARCHIVE"
DEFAULT_ARCHIVE = ROOT.parent / "shared" / "datasets" / "sign-language-digits.zip"


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite tracking store with artifacts under tmp_path (never a file: URI)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tests")
    monkeypatch.setenv("SIGN_DIGITS_DATA_DIR", str(tmp_path / "input_dataset"))
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    import mlflow

    mlflow.set_tracking_uri(uri)
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
