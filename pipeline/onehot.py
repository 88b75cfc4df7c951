"""One-hot: an ingest run's integer labels become one-hot matrices (label k is column k)."""

import logging
import tempfile
from pathlib import Path

import mlflow
import numpy as np

from pipeline import cli, config, ingest, tracking
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.onehot")


def encode(labels: np.ndarray, num_classes: int = config.NUM_CLASSES) -> np.ndarray:
    """Integer labels (n,) as a float32 (n, num_classes) one-hot matrix.

    Raises PipelineError for labels that are not integers in [0, num_classes).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise PipelineError(f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    outside = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if outside.size:
        raise PipelineError(
            f"labels {outside[:10].tolist()} are outside [0, {num_classes}): "
            "check num_classes or the ingest run"
        )
    return np.eye(num_classes, dtype=np.float32)[labels]


def decode(onehot: np.ndarray) -> np.ndarray:
    """The integer labels of a one-hot matrix (the inverse of `encode`)."""
    return np.argmax(onehot, axis=1).astype(np.int64)


def run(ingest_folder: Path, out_dir: Path, num_classes: int = config.NUM_CLASSES) -> dict[str, np.ndarray]:
    """Encode every split's labels of a downloaded ingest artifact; write them to `out_dir`."""
    arrays = ingest.load(ingest_folder)
    encoded = {f"y_{split}": encode(arrays[f"y_{split}"], num_classes) for split in config.SPLITS}
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / config.LABELS_FILE, **encoded)
    return encoded


def load(folder: Path) -> dict[str, np.ndarray]:
    """The one-hot label arrays of a downloaded onehot artifact folder."""
    path = folder / config.LABELS_FILE
    try:
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path}: cannot read the one-hot labels ({error})") from None


def parse_args(argv: list[str] | None):
    parser = cli.parser("onehot", __doc__.splitlines()[0])
    parser.add_argument("--ingest-run-id", default="", help="ingest run to encode (default: the latest)")
    parser.add_argument("--num-classes", type=cli.int_range(2), default=config.NUM_CLASSES)
    return parser.parse_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    upstream = tracking.upstream_run("ingest", args.ingest_run_id)
    with tracking.stage_run("onehot", vars(args)), tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tag(config.INGEST_RUN_TAG, upstream.info.run_id)
        folder = tracking.download(upstream, config.INGEST_ARTIFACT)
        out_dir = Path(tmp) / config.ONEHOT_ARTIFACT
        encoded = run(folder, out_dir, args.num_classes)
        mlflow.log_artifacts(str(out_dir), artifact_path=config.ONEHOT_ARTIFACT)
        shapes = ", ".join(f"{name} {array.shape}" for name, array in encoded.items())
        log.info("encoded ingest run %s: %s", upstream.info.run_id, shapes)


if __name__ == "__main__":
    cli.run(main)
