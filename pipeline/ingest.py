"""Ingest: photos from a URL, a .zip or a folder become uint8 arrays in a stratified split.

Labels come from the layout (`Dataset/<digit>/*.JPG`, `<digit>/<file>`, or flat
`<digit>_<n>.JPG` names), never from listing order. Files that cannot be used
are skipped, listed and reported; the stage fails only when what is left
cannot make a dataset. Photos whose label the photo contradicts
(config.CONTRADICTED_LABELS) are listed too, and left out of training only.
"""

import hashlib
import logging
import os
import re
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from rich.progress import track

from pipeline import cli, config, images, sources, tracking
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.ingest")

_DIGIT = re.compile(r"\d+")
_FLAT_NAME = re.compile(r"(\d+)_.+")
MIN_PER_CLASS = 3  # one image each for train, validation and test


@dataclass
class Ingested:
    """What ingest produced: arrays per split, the manifest, and what was skipped."""

    arrays: dict[str, np.ndarray]
    manifest: pd.DataFrame
    skipped: pd.DataFrame
    counts: pd.DataFrame
    digests: dict[str, str]


def run(
    source: str,
    out_dir: Path,
    sha256: str | None = None,
    image_size: int = config.IMAGE_SIZE,
    val_fraction: float = config.VAL_FRACTION,
    test_fraction: float = config.TEST_FRACTION,
    seed: int = config.SEED,
    max_per_class: int = 0,
    data_dir: Path | None = None,
) -> Ingested:
    """Fetch, decode and split the photos in `source`; write the results to `out_dir`."""
    check_params(image_size, val_fraction, test_fraction, max_per_class)
    fetched = sources.fetch(source, data_dir or config.data_dir(), sha256)
    # Discover
    files, skipped = discover(fetched.folder)
    skipped = fetched.skipped + skipped
    # Decode
    manifest, pixels, rejected = decode(files, fetched.folder, image_size, max_per_class)
    skipped += rejected
    check_classes(manifest, fetched.folder)
    # Split
    manifest["split"] = assign_splits(manifest, val_fraction, test_fraction, seed)
    manifest, contradicted = leave_out_of_training(manifest)
    skipped += contradicted
    check_training_split(manifest, contradicted)
    manifest = manifest.sort_values(["split", "label", "file"], key=_split_order).reset_index(drop=True)
    manifest["index"] = manifest.groupby("split").cumcount()
    arrays = _arrays(manifest, pixels)
    result = Ingested(
        arrays=arrays,
        manifest=manifest,
        skipped=pd.DataFrame(skipped, columns=["file", "reason"]),
        counts=count(manifest),
        digests={split: digest(arrays[f"x_{split}"], arrays[f"y_{split}"]) for split in config.SPLITS},
    )
    write(result, out_dir)
    return result


def check_params(image_size: int, val_fraction: float, test_fraction: float, max_per_class: int = 0) -> None:
    """Raise PipelineError naming the parameter and its allowed range when a value is impossible."""
    if not config.MIN_IMAGE_SIZE <= image_size <= config.MAX_IMAGE_SIZE:
        raise PipelineError(
            f"image_size={image_size}: must be from {config.MIN_IMAGE_SIZE} to "
            f"{config.MAX_IMAGE_SIZE} pixels (ResNet50 needs at least {config.MIN_IMAGE_SIZE})"
        )
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise PipelineError(f"{name}={value}: must lie strictly between 0 and 1")
    if val_fraction + test_fraction >= 1:
        raise PipelineError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction:g}: must be below 1 "
            "to leave images for training"
        )
    if 0 < max_per_class < MIN_PER_CLASS:
        raise PipelineError(
            f"max_per_class={max_per_class}: must be 0 (all) or at least {MIN_PER_CLASS} "
            "(one image each for training, validation and test)"
        )


def discover(root: Path) -> tuple[list[tuple[Path, int]], list[tuple[str, str]]]:
    """Every image file under `root` with the label its place in the layout gives it."""
    class_root = _class_root(root)
    if class_root is not None:
        return _class_tree(class_root, root)
    flat_root = _flat_root(root)
    if flat_root is not None:
        return _flat(flat_root, root)
    raise PipelineError(
        f"{root}: found no images in a known layout; expected Dataset/<digit>/*.JPG, "
        "<digit>/<file> folders, or flat <digit>_<n>.JPG names"
    )


def _walk(root: Path):
    for folder, dirnames, filenames in os.walk(root):
        dirnames.sort()
        yield Path(folder), dirnames, sorted(filenames)


def _class_root(root: Path) -> Path | None:
    """The shallowest folder with digit-named subfolders, preferring one called Dataset."""
    found = [
        folder for folder, dirnames, _ in _walk(root) if any(_DIGIT.fullmatch(name) for name in dirnames)
    ]
    if not found:
        return None
    return min(found, key=lambda folder: (len(folder.parts), folder.name != "Dataset", str(folder)))


def _flat_root(root: Path) -> Path | None:
    for folder, _, filenames in _walk(root):
        if any(_FLAT_NAME.fullmatch(name) for name in filenames):
            return folder
    return None


def _class_tree(class_root: Path, root: Path):
    files, skipped = [], []
    for child in sorted(class_root.iterdir()):
        if not child.is_dir() or child.is_symlink():
            if not child.name.startswith("."):
                skipped.append((_rel(child, root), _unusable(child, root) or "not inside a digit folder"))
            continue
        label = _label(child.name)
        for path in sorted(p for p in child.rglob("*") if p.is_file() or p.is_symlink()):
            reason = _unusable(path, root) or (None if label is not None else _unknown(child.name))
            if reason:
                skipped.append((_rel(path, root), reason))
            else:
                files.append((path, label))
    return files, skipped


def _flat(folder: Path, root: Path):
    files, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.is_dir() and not path.is_symlink():
            continue
        match = _FLAT_NAME.fullmatch(path.name)
        label = _label(match.group(1)) if match else None
        reason = _unusable(path, root)
        if not reason and not match:
            reason = "name does not start with <digit>_"
        elif not reason and label is None:
            reason = _unknown(match.group(1))
        if reason:
            skipped.append((_rel(path, root), reason))
        else:
            files.append((path, label))
    return files, skipped


def _label(name: str) -> int | None:
    return int(name) if _DIGIT.fullmatch(name) and int(name) < config.NUM_CLASSES else None


def _unknown(name: str) -> str:
    return f"unknown label {name!r}: labels must be the digits 0-{config.NUM_CLASSES - 1}"


def _unusable(path: Path, root: Path) -> str | None:
    """Why a file found under `root` cannot be used (None when it can).

    Symbolic links are only followed to files inside the dataset: a link that
    leaves it, dangles, loops or names a folder is refused with the reason.
    """
    if path.name.startswith("."):
        return "hidden file"
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError for a loop
            return "symbolic link to nothing (it dangles or loops)"
        if not target.is_relative_to(root.resolve()):
            return f"symbolic link to {target}, outside the dataset"
        if not target.is_file():
            return "symbolic link to a folder (not followed)"
    return None


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def decode(files: list[tuple[Path, int]], root: Path, image_size: int, max_per_class: int):
    """Hash and decode the files; with `max_per_class`, keep the first k per class by content hash.

    Returns the manifest (one row per kept image), the pixels by file, and the
    files rejected with their reasons. Identical content under two labels is
    ambiguous and rejected in every copy.
    """
    hashed, rejected = [], []
    for path, label in files:
        try:
            hashed.append((path, label, hashlib.sha256(_read(path, _rel(path, root))).hexdigest()))
        except images.ImageError as error:
            rejected.append((_rel(path, root), str(error)))
        except OSError as error:
            rejected.append((_rel(path, root), f"cannot be read ({error.strerror or error})"))
    labels_by_hash = defaultdict(set)
    for _, label, sha in hashed:
        labels_by_hash[sha].add(label)
    rows, pixels = [], {}
    kept = defaultdict(int)
    for path, label, sha in track(
        sorted(hashed, key=lambda item: (item[2], str(item[0]))), description="decoding", transient=True
    ):
        name = _rel(path, root)
        if len(labels_by_hash[sha]) > 1:
            rejected.append((name, f"identical content is labelled {sorted(labels_by_hash[sha])}"))
            continue
        if max_per_class and kept[label] >= max_per_class:
            continue
        try:
            data = _read(path, name)
            pixels[name] = images.preprocess(data, image_size, name)
        except (images.ImageError, OSError) as error:
            rejected.append((name, str(error)))
            continue
        rows.append((name, sha, label, *images.photo_size(data)))
        kept[label] += 1
    manifest = pd.DataFrame(rows, columns=["file", "sha256", "label", "width", "height"])
    for name, reason in rejected:
        log.warning("skipped %s: %s", name, reason)
    return manifest, pixels, rejected


def _read(path: Path, name: str) -> bytes:
    """The bytes of one file; ImageError, without reading it, when it is too large for a photo."""
    size = path.stat().st_size
    if size > config.MAX_IMAGE_FILE_BYTES:
        limit = config.MAX_IMAGE_FILE_BYTES
        raise images.ImageError(f"{name}: {size:,} bytes is over the {limit:,}-byte limit for one photo")
    return path.read_bytes()


def check_classes(manifest: pd.DataFrame, root: Path) -> None:
    """Every digit needs distinct images for training, validation and test."""
    per_class = manifest.drop_duplicates("sha256").groupby("label").size()
    short = {
        label: int(per_class.get(label, 0))
        for label in range(config.NUM_CLASSES)
        if per_class.get(label, 0) < MIN_PER_CLASS
    }
    if short:
        listed = ", ".join(f"digit {label}: {n}" for label, n in short.items())
        raise PipelineError(
            f"{root}: too few usable images ({listed}); every digit needs at least "
            f"{MIN_PER_CLASS} distinct images (see the skipped files above)"
        )


def assign_splits(manifest: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """A reproducible stratified split in which identical files always share a split."""
    rng = np.random.default_rng(seed)
    split_of_hash = {}
    for label in sorted(manifest["label"].unique()):
        hashes = sorted(manifest.loc[manifest["label"] == label, "sha256"].unique())
        order = rng.permutation(len(hashes))
        n_test = max(1, round(len(hashes) * test_fraction))
        n_val = max(1, round(len(hashes) * val_fraction))
        for rank, position in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            split_of_hash[hashes[position]] = split
    return manifest["sha256"].map(split_of_hash)


def leave_out_of_training(manifest: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The manifest without the training photos listed in config.CONTRADICTED_LABELS, and those
    photos with the reason. Done after the split, so every other photo keeps its split."""
    listed = manifest["sha256"].isin(config.CONTRADICTED_LABELS) & (manifest["split"] == "train")
    left_out = [
        (name, f"left out of training: the photo shows {config.CONTRADICTED_LABELS[sha]}")
        for name, sha in zip(manifest.loc[listed, "file"], manifest.loc[listed, "sha256"])
    ]
    for name, reason in left_out:
        log.info("%s %s", name, reason)
    return manifest[~listed], left_out


def check_training_split(manifest: pd.DataFrame, left_out: list[tuple[str, str]]) -> None:
    """Every digit needs a photo to train on once the split and the photos left out are done.

    check_classes cannot promise it: large fractions round a small digit's training share to
    none, and a listed photo may be its digit's only training photo."""
    trained = set(manifest.loc[manifest["split"] == "train", "label"])
    missing = [str(label) for label in range(config.NUM_CLASSES) if label not in trained]
    if not missing:
        return
    also = f" ({', '.join(name for name, _ in left_out)} left out of training)" if left_out else ""
    raise PipelineError(
        f"no training photo for digit {', '.join(missing)} after the split{also}; "
        "raise max_per_class (0 takes every photo) or lower val_fraction / test_fraction"
    )


def _split_order(column: pd.Series) -> pd.Series:
    return column.map(config.SPLITS.index) if column.name == "split" else column


def _arrays(manifest: pd.DataFrame, pixels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays = {}
    for split in config.SPLITS:
        rows = manifest[manifest["split"] == split]
        arrays[f"x_{split}"] = np.stack([pixels[name] for name in rows["file"]])
        arrays[f"y_{split}"] = rows["label"].to_numpy(dtype=np.int64)
    return arrays


def count(manifest: pd.DataFrame) -> pd.DataFrame:
    counts = pd.crosstab(manifest["label"], manifest["split"]).reindex(
        columns=list(config.SPLITS), fill_value=0
    )
    counts["total"] = counts.sum(axis=1)
    return counts


def digest(x: np.ndarray, y: np.ndarray) -> str:
    """A content digest over every pixel and label (MLflow's own samples only the start)."""
    h = hashlib.sha256()
    for array in (x, y):
        h.update(str(array.shape).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:32]


def write(result: Ingested, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / config.IMAGES_FILE, **result.arrays)
    result.manifest.to_csv(out_dir / config.MANIFEST_FILE, index=False)
    result.skipped.to_csv(out_dir / config.SKIPPED_FILE, index=False)
    result.counts.to_csv(out_dir / config.COUNTS_FILE)
    preview(result.arrays["x_train"], result.arrays["y_train"]).save(out_dir / config.PREVIEW_FILE)


def preview(x: np.ndarray, y: np.ndarray, per_class: int = 8) -> Image.Image:
    """A grid with one row per digit and up to `per_class` training images in each."""
    size = x.shape[1]
    label_width = 24
    grid = Image.new("RGB", (label_width + per_class * size, config.NUM_CLASSES * size), "white")
    draw = ImageDraw.Draw(grid)
    for label in range(config.NUM_CLASSES):
        draw.text((6, label * size + size // 2 - 6), str(label), fill="black")
        for column, index in enumerate(np.flatnonzero(y == label)[:per_class]):
            grid.paste(Image.fromarray(x[index]), (label_width + column * size, label * size))
    return grid


def load(folder: Path) -> dict[str, np.ndarray]:
    """The arrays of a downloaded ingest artifact folder."""
    path = folder / config.IMAGES_FILE
    try:
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise PipelineError(f"{path}: cannot read the ingest arrays ({error})") from None


def log_to_mlflow(result: Ingested, out_dir: Path, source: str) -> None:
    """Log counts, the artifact folder, and each split as an MLflow dataset input."""
    mlflow.log_metrics(
        {
            "num_images": len(result.manifest),
            "num_skipped": len(result.skipped),
            **{f"num_{split}": int(result.counts[split].sum()) for split in config.SPLITS},
        }
    )
    mlflow.log_artifacts(str(out_dir), artifact_path=config.INGEST_ARTIFACT)
    if "://" not in source:
        source = Path(source).resolve().as_uri()
    for split, context in zip(config.SPLITS, ("training", "validation", "testing")):
        with warnings.catch_warnings():
            # MLflow registers file:// twice and warns that it picked one of the two.
            warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
            dataset = mlflow.data.from_numpy(
                features=result.arrays[f"x_{split}"],
                targets=result.arrays[f"y_{split}"],
                source=source,
                name=f"{config.DATASET_NAME}-{split}",
                digest=result.digests[split],
            )
        mlflow.log_input(dataset, context=context)


def add_options(parser) -> None:
    """Ingest's options (main passes the same ones through)."""
    parser.add_argument("--source", default=config.DATASET_URL, help="https URL, .zip file or folder")
    parser.add_argument("--sha256", type=cli.sha256_hex, default="", help="expected sha256 of the archive")
    parser.add_argument("--image-size", type=cli.image_size, default=config.IMAGE_SIZE)
    parser.add_argument("--val-fraction", type=cli.fraction, default=config.VAL_FRACTION)
    parser.add_argument("--test-fraction", type=cli.fraction, default=config.TEST_FRACTION)
    parser.add_argument("--seed", type=cli.seed, default=config.SEED)
    parser.add_argument(
        "--max-per-class",
        type=cli.non_negative_int,
        default=0,
        help="keep at most this many per digit (0: all)",
    )


def parse_args(argv: list[str] | None):
    parser = cli.parser("ingest", __doc__.splitlines()[0])
    add_options(parser)
    return parser.parse_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_params(args.image_size, args.val_fraction, args.test_fraction, args.max_per_class)
    sources.check(args.source, args.sha256)
    with tracking.stage_run("ingest", vars(args)), tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / config.INGEST_ARTIFACT
        result = run(out_dir=out_dir, **vars(args))
        log_to_mlflow(result, out_dir, args.source)
        summary = ", ".join(f"{split} {int(result.counts[split].sum())}" for split in config.SPLITS)
        log.info("ingested %d images (%s); skipped %d", len(result.manifest), summary, len(result.skipped))
        if len(result.skipped):
            log.info(
                "skipped files are listed in the run's %s/%s", config.INGEST_ARTIFACT, config.SKIPPED_FILE
            )


if __name__ == "__main__":
    cli.run(main)
