"""Every default of the pipeline, in one place.

Stages, `MLproject` and the tests read their defaults from here; nothing else
hard-codes a number, a name or a path that a user might want to change.
"""

import os
from pathlib import Path

# Dataset
DATASET_COMMIT = "4b09433ef9d5c60602e8805bb54b8aa2428527f8"
DATASET_URL = f"https://github.com/ardamavi/Sign-Language-Digits-Dataset/archive/{DATASET_COMMIT}.zip"
DATASET_NAME = "sign-language-digits"
NUM_CLASSES = 10
IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 32  # the smallest input ResNet50's five down-samplings can take
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15
SEED = 42

# Where ingest caches downloads and unpacked archives (relative to the working
# directory, which is the project root under `mlflow run .`).
DATA_DIR_ENV = "SIGN_DIGITS_DATA_DIR"
DEFAULT_DATA_DIR = Path("input_dataset")

# Guards against hostile input.
MAX_IMAGE_PIXELS = 50_000_000  # 7,000 x 7,000; a phone photo is ~12 MP
MAX_IMAGE_FILE_BYTES = 64 * 1024 * 1024
MAX_UNPACKED_BYTES = 4 * 1024**3
MAX_COMPRESSION_RATIO = 200  # JPEGs barely compress; zip bombs reach 1000+
DOWNLOAD_TIMEOUT_S = 30.0

# Tracking
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "sign-language-digits"
STAGE_TAG = "pipeline.stage"
COMMIT_TAG = "pipeline.git_commit"
DIRTY_TAG = "pipeline.git_dirty"

# Artifact folders each stage writes (the next stage reads them by these names).
INGEST_ARTIFACT = "dataset"
ONEHOT_ARTIFACT = "onehot"
BUILD_ARTIFACT = "model"
IMAGES_FILE = "images.npz"
MANIFEST_FILE = "manifest.csv"
SKIPPED_FILE = "skipped.csv"
COUNTS_FILE = "counts.csv"
PREVIEW_FILE = "preview.png"
LABELS_FILE = "labels.npz"
ARCHITECTURE_FILE = "architecture.json"
SUMMARY_FILE = "summary.txt"

SPLITS = ("train", "val", "test")


def data_dir() -> Path:
    """The folder for downloads and unpacked archives ($SIGN_DIGITS_DATA_DIR wins)."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI when set, else SQLite in the working directory."""
    return os.environ.get(TRACKING_URI_ENV) or DEFAULT_TRACKING_URI


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
