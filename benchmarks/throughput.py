"""Training and inference throughput: the project's training step and served model against the reference.

    python benchmarks/throughput.py                 # the default run (under ten minutes here)
    python benchmarks/throughput.py --tiny          # a few steps, to check that it runs
    python benchmarks/throughput.py --mlflow        # also log the table to MLflow

Variants, each in a fresh process:
- reference-train-bN: keras.applications.ResNet50(weights=None), float32, Adam, `model.fit` on
  NumPy arrays at batch N (the reference implementation the speed issue names);
- project-train-bN: the training step that `train` and `tune` share (pipeline.fitting: precision
  policy, AdamW with warm-up and cosine decay, label smoothing) fed by pipeline.data's tf.data
  pipeline with augmentation, at batch N;
- reference-predict: the reference model's `predict` on 64 preprocessed 64x64 images;
- project-predict: the registered pyfunc, loaded with mlflow.pyfunc.load_model, on 64 raw JPEG
  photos (decoding and preprocessing included), as served by default: test-time augmentation for
  the photos below the confidence gate, the stages of `--bfloat16-stages` in bfloat16 (by default the
  first of config.SERVING_BFLOAT16_CANDIDATES, what train serves when the validation photos allow
  it; this untrained model is not checked). The untrained model is unsure of every photo: this is
  the worst case, 5 forward passes a photo. `--model` with `--photos` (a folder or .zip) or
  `--split test` (that split of the ingest run the model was trained on, read from the source
  it ingested) measures a trained model on real photos instead;
- project-predict-single: the same with `test_time_augmentation` off (one forward pass a photo);
- project-predict-single-float32: that, all in float32 (what train serves when no candidate passes;
  not with `--model`).

Each variant warms up first (tracing, oneDNN primitive creation), then times `--repeat`
repetitions: an epoch of `--steps` steps for training, one call for inference. Prints median,
range and peak RSS per variant and the ratios, and writes the table as JSON, with the machine
(processor, cores, and which bfloat16 instructions it has: the served stages and the training
step run on AMX where there is one, on AVX512-BF16 alone at a lower speed elsewhere).
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "throughput.json"
PREDICT_BATCH = 64
PREDICT_VARIANTS = (
    "project-predict",
    "project-predict-single",
    "project-predict-single-float32",
)


def random_images(count: int, size: int = 64):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, count)]
    return x, y


def time_training(model, data, steps: int, repeat: int) -> list[float]:
    """Seconds of each timed epoch of `steps` steps (the first epoch is warm-up)."""
    import keras

    seconds = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.start)

    model.fit(data, epochs=repeat + 1, steps_per_epoch=steps, callbacks=[Clock()], verbose=0)
    return seconds[1:]


def reference_model():
    import keras

    return keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)


def reference_train(batch_size: int, steps: int, repeat: int) -> list[float]:
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy("float32")
    model = reference_model()
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    x, y = random_images(batch_size * steps)
    x = x.astype("float32") / 255
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).repeat()
    return time_training(model, data, steps, repeat)


def project_train(batch_size: int, steps: int, repeat: int) -> list[float]:
    from pipeline import config, data, fitting

    fitting.set_precision(config.PRECISION)
    x, y = random_images(batch_size * steps)
    model = fitting.new_model(64, 10)
    fitting.compile_model(model, config.LEARNING_RATE, steps, repeat + 1)
    dataset = data.dataset(x, y, batch_size, training=True, augment=True, endless=True)
    return time_training(model, dataset, steps, repeat)


def time_calls(call, repeat: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        call()
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def reference_predict(repeat: int) -> list[float]:
    import keras

    keras.mixed_precision.set_global_policy("float32")
    model = reference_model()
    x = random_images(PREDICT_BATCH)[0].astype("float32") / 255
    return time_calls(lambda: model.predict(x, batch_size=PREDICT_BATCH, verbose=0), repeat)


def jpeg_photos(count: int) -> list[bytes]:
    """Raw photos as users send them: 100x100 JPEGs (the dataset's own size)."""
    import io

    from PIL import Image

    photos = []
    for pixels in random_images(count, size=100)[0]:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


def photo_files(path: Path, count: int) -> list[bytes]:
    """`count` photos (.jpg, .jpeg, .png) from a folder or .zip, spread evenly over their sorted names."""
    suffixes = (".jpg", ".jpeg", ".png")
    if path.suffix.lower() == ".zip":
        with zipfile.ZipFile(path) as archive:
            names = sorted(name for name in archive.namelist() if name.lower().endswith(suffixes))
            photos = [archive.read(name) for name in spread(names, count)]
    else:
        names = sorted(file for file in path.rglob("*") if file.suffix.lower() in suffixes)
        photos = [file.read_bytes() for file in spread(names, count)]
    if len(photos) < count:
        raise SystemExit(f"--photos {path}: {len(photos)} photos (.jpg, .jpeg, .png); need {count}")
    return photos


def spread(names: list, count: int) -> list:
    """`count` of `names`, evenly spaced from the first (all of them when there are fewer)."""
    return names[:: max(1, len(names) // count)][:count]


def split_photos(model_uri: str, split: str, folder: Path) -> Path:
    """Copy to `folder` the photos of `split` in the manifest of the ingest run that trained the
    model at `model_uri` (the latest ingest run when its source run names none), from the source
    that run ingested (fetched again if it is not cached); SystemExit naming what is missing."""
    import pandas as pd

    from pipeline import config, evaluate, sources, tracking
    from pipeline.errors import PipelineError

    tracking.configure()
    try:
        run = evaluate.ingest_run("", evaluate.resolve(model_uri, config.MODEL_NAME))
        manifest = pd.read_csv(tracking.download(run, f"{config.INGEST_ARTIFACT}/{config.MANIFEST_FILE}"))
        fetched = sources.fetch(unquoted(run.data.params["source"]), config.data_dir())
    except PipelineError as error:
        raise SystemExit(f"--split {split}: {error}") from None
    names = manifest.loc[manifest["split"] == split, "file"]
    if len(names) < PREDICT_BATCH:
        found = f"ingest run {run.info.run_id} has {len(names)} photos in it"
        raise SystemExit(f"--split {split}: {found}; need {PREDICT_BATCH}")
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fetched.folder / name, folder / name)
    return folder


def unquoted(param: str) -> str:
    """A run parameter as the command got it: `mlflow run` logs a value it had to quote, quoted."""
    return shlex.split(param)[0] if param[:1] in ("'", '"') and param[-1:] == param[:1] else param


def project_predict(variant: str, args) -> tuple[list[float], dict]:
    """Seconds per call of the pyfunc as the registry hands it out, and what it was: the model at
    `--model`, or an untrained one logged to a throw-away SQLite store; on 64 photos from the folder
    or .zip `--photos`, or random JPEGs."""
    import mlflow
    import pandas as pd

    from pipeline import config, fitting, serving, tracking

    photos = photo_files(args.photos, PREDICT_BATCH) if args.photos else jpeg_photos(PREDICT_BATCH)
    batch = pd.DataFrame({"image": photos})
    single = variant.startswith("project-predict-single")
    params = {serving.TEST_TIME_AUGMENTATION: False} if single else None
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            tracking.configure()
            served = mlflow.pyfunc.load_model(args.model)
        else:
            os.chdir(tmp)
            mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
            fitting.set_precision(config.PRECISION)
            stages = () if variant.endswith("float32") else args.bfloat16_stages
            with mlflow.start_run():
                info = serving.log_model(fitting.new_model(64, 10), "benchmark", jpeg_photos(1)[0], stages)
            served = mlflow.pyfunc.load_model(info.model_uri)
        seconds = time_calls(lambda: served.predict(batch, params), args.repeat)
        shifted = 0.0
        if not single:
            confidence = served.predict(batch, {serving.TEST_TIME_AUGMENTATION: False})["confidence"]
            shifted = float(served.unwrap_python_model().shifted_photos(confidence.to_numpy()).mean())
    return seconds, {
        "bfloat16_stages": (served.model_config or {}).get(serving.BFLOAT16_STAGES_KEY, []),
        "share_shifted": shifted,
    }


def run_child(variant: str, args) -> dict:
    """Measure one variant in this process."""
    from pipeline import tracking

    kind, _, batch = variant.rpartition("-b") if "-train-" in variant else (variant, "", "")
    served = {}
    if kind == "reference-train":
        seconds, images = reference_train(int(batch), args.steps, args.repeat), int(batch) * args.steps
    elif kind == "project-train":
        seconds, images = project_train(int(batch), args.steps, args.repeat), int(batch) * args.steps
    elif variant == "reference-predict":
        seconds, images = reference_predict(args.repeat), PREDICT_BATCH
    elif variant in PREDICT_VARIANTS:
        if args.model and variant.endswith("float32"):
            raise SystemExit(f"{variant}: not with --model (a registered model's stages are its own)")
        (seconds, served), images = project_predict(variant, args), PREDICT_BATCH
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    rates = [images / s for s in seconds]
    return {
        "variant": variant,
        "images_per_s": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "repeats": len(rates),
        "peak_rss_mib": tracking.peak_rss_mib(),
        **served,
    }


def measure(variant: str, args) -> dict:
    """Run one variant in a fresh interpreter and return its figures."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    options = ["--steps", str(args.steps), "--repeat", str(args.repeat)]
    if args.model:
        options += ["--model", args.model]
    else:
        options += ["--bfloat16-stages", ",".join(map(str, args.bfloat16_stages))]
    options += ["--photos", str(args.photos)] if args.photos else []
    done = subprocess.run(
        [sys.executable, __file__, "--child", variant, *options],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(rows: dict[str, dict], batch_size: int) -> dict[str, float]:
    rate = {name: row["images_per_s"] for name, row in rows.items()}
    pairs = {
        f"train: project b{batch_size} / reference b32": (
            f"project-train-b{batch_size}",
            "reference-train-b32",
        ),
        "train: project b32 / reference b32": ("project-train-b32", "reference-train-b32"),
        f"train: project b{batch_size} / reference b{batch_size}": (
            f"project-train-b{batch_size}",
            f"reference-train-b{batch_size}",
        ),
        "predict: project pyfunc / reference predict": ("project-predict", "reference-predict"),
        "predict: project pyfunc, one view / reference": ("project-predict-single", "reference-predict"),
        "predict: project pyfunc, one view, float32 / reference": (
            "project-predict-single-float32",
            "reference-predict",
        ),
    }
    return {name: rate[a] / rate[b] for name, (a, b) in pairs.items() if a in rate and b in rate}


def print_table(rows: dict[str, dict], found: dict[str, float], host: dict) -> None:
    print(
        f"machine: {host['processor']}, {host['cores']} cores, bfloat16 in hardware: {host['bfloat16']}, "
        f"TensorFlow threads: {host['threads']}"
    )
    print(f"{'variant':<32}{'images/s':>10}{'range':>18}{'peak RSS MiB':>14}{'shifted':>9}")
    for row in rows.values():
        spread = f"{row['min']:.1f}-{row['max']:.1f}"
        shifted = f"{row['share_shifted']:.0%}" if "share_shifted" in row else ""
        print(
            f"{row['variant']:<32}{row['images_per_s']:>10.1f}{spread:>18}{row['peak_rss_mib']:>14.0f}"
            f"{shifted:>9}"
        )
    for name, value in found.items():
        print(f"{name:<56}{value:>6.2f}x")


def log_to_mlflow(rows: dict[str, dict], found: dict[str, float], host: dict, path: Path) -> None:
    import mlflow

    from pipeline import tracking

    tracking.configure()
    with mlflow.start_run(run_name="throughput-benchmark", tags={"pipeline.stage": "benchmark"}):
        mlflow.log_params({f"machine.{key}": value for key, value in host.items()})
        for name, row in rows.items():
            mlflow.log_metrics(
                {f"{name}.images_per_s": row["images_per_s"], f"{name}.peak_rss_mib": row["peak_rss_mib"]}
            )
        mlflow.log_metrics(
            {"ratio." + name.replace(":", "").replace("/", "per"): v for name, v in found.items()}
        )
        mlflow.log_artifact(str(path))


def stage_list(text: str) -> tuple[int, ...]:
    try:
        stages = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: stages are numbers 1-5, like 4,5") from None
    if not set(stages) <= {1, 2, 3, 4, 5}:
        raise argparse.ArgumentTypeError(f"{text!r}: stages are numbers 1-5, like 4,5")
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions per variant")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed epoch")
    parser.add_argument("--tiny", action="store_true", help="1 repetition of 1 step, to check it runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--mlflow", action="store_true", help="also log the table to MLflow")
    parser.add_argument("--variants", nargs="+", help="measure only these (default: all)")
    parser.add_argument(
        "--bfloat16-stages",
        type=stage_list,
        help="ResNet stages the served network computes in bfloat16, like 4,5; empty: none "
        "(default: the first of config.SERVING_BFLOAT16_CANDIDATES)",
    )
    parser.add_argument("--model", help="a served model's URI, like models:/sign-digits-resnet50/latest")
    photos = parser.add_mutually_exclusive_group()
    photos.add_argument("--photos", type=Path, help="a folder or .zip of photos to predict (64 of them)")
    photos.add_argument(
        "--split",
        choices=("train", "val", "test"),
        help="with --model: predict 64 photos of this split of the ingest run the model was trained on",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from pipeline import config

    if args.model and args.bfloat16_stages is not None:
        parser.error("--bfloat16-stages: not with --model (a registered model serves the stages train chose)")
    if args.bfloat16_stages is None:
        args.bfloat16_stages = config.SERVING_BFLOAT16_CANDIDATES[0]
    if args.photos and not args.photos.exists():
        parser.error(f"--photos {args.photos}: no such folder or .zip")
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return
    if args.split and not args.model:
        parser.error("--split needs --model: the split of the ingest run that trained that model")
    if args.tiny:
        args.repeat, args.steps = 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        if args.split:
            args.photos = split_photos(args.model, args.split, Path(tmp))
        run_parent(args)


def run_parent(args) -> None:
    """Measure every variant asked for, each in its own process; print, write and log the table."""
    from pipeline import config, tracking

    batch = config.BATCH_SIZE
    variants = sorted({"reference-train-b32", f"reference-train-b{batch}", "project-train-b32"})
    variants += [f"project-train-b{batch}", "reference-predict", "project-predict", "project-predict-single"]
    variants += [] if args.model else ["project-predict-single-float32"]
    rows = {}
    for variant in dict.fromkeys(args.variants or variants):
        rows[variant] = measure(variant, args)
        print(f"  {variant}: {rows[variant]['images_per_s']:.1f} images/s", file=sys.stderr, flush=True)
    found = ratios(rows, batch)
    host = tracking.machine()
    print_table(rows, found, host)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table = {"machine": host, "rows": list(rows.values()), "ratios": found}
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}")
    if args.mlflow:
        log_to_mlflow(rows, found, host, args.out)


if __name__ == "__main__":
    main()
