"""Evaluate: a model on an ingest run's test split; a better registered version becomes the champion.

The model is loaded the way users load it (`mlflow.pyfunc.load_model`), so what is
measured is what is served. The current champion is scored on the same test split,
and the candidate takes the alias only when it reaches the minimum accuracy and
beats the champion strictly.
"""

import logging
import math
import re
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from pipeline import cli, config, ingest, tracking
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.evaluate")

PROBABILITY_COLUMNS = [f"p{digit}" for digit in range(config.NUM_CLASSES)]
MAX_GALLERY = 48  # the most confident mistakes; more make an unreadable picture
GALLERY_COLUMNS = 8

_VERSION_URI = re.compile(r"models:/(?P<name>[^/@]+)/(?P<version>\d+)")
_ALIAS_URI = re.compile(r"models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)")
_RUN_URI = re.compile(r"runs:/(?P<run_id>[^/]+)/.+")
_LOGGED_URI = re.compile(r"models:/(?P<model_id>m-[^/@]+)")
_URI_FORMS = "models:/<name>/<version>, models:/<name>@<alias>, runs:/<run_id>/<path> or models:/m-<id>"


@dataclass(frozen=True)
class Target:
    """The model to evaluate; `version` is None when it is not a registered version."""

    uri: str
    name: str
    version: str | None
    source_run_id: str | None


# Evaluation


def run(model_uri: str, x_test: np.ndarray, y_test: np.ndarray, out_dir: Path) -> dict[str, float]:
    """Score the pyfunc at `model_uri` on uint8 images `x_test` (n, h, w, 3) and labels `y_test` (n,).

    Writes the per-class report, the confusion matrix, the gallery of mistakes and
    every prediction to `out_dir`; returns test_accuracy with its 95% interval
    (test_accuracy_ci95_low and _high), test_loss, macro_f1 and num_misclassified, and for
    a model of this pipeline how closely it follows its Keras model and, when it answers
    with test-time augmentation, test_accuracy_single_view (every photo alone) and
    test_share_shifted (the share of photos it also shifted), and test_accuracy_mirrored: on
    the photos mirrored left to right, as a left hand or a front camera that mirrors shows a
    sign. Raises PipelineError when the URI does not load or the arrays do not match.
    """
    from pipeline import serving  # TensorFlow: not imported before the arguments are checked

    check_split(x_test, y_test)
    served = load_model(model_uri)
    predictions = predict(served, x_test)
    probabilities = predictions[PROBABILITY_COLUMNS].to_numpy(dtype=np.float64)
    predicted = predictions["digit"].to_numpy(dtype=np.int64)
    confidence = predictions["confidence"].to_numpy(dtype=np.float64)
    metrics = score(y_test, predicted, probabilities)
    python_model = served.unwrap_python_model()
    shifted = np.zeros(len(x_test), dtype=bool)
    if getattr(python_model, "test_time_shift", 0):
        single = predict(served, x_test, {serving.TEST_TIME_AUGMENTATION: False})
        shifted = python_model.shifted_photos(single["confidence"].to_numpy())
        metrics["test_accuracy_single_view"] = float(np.mean(single["digit"].to_numpy() == y_test))
        metrics["test_share_shifted"] = float(np.mean(shifted))
    mirrored = predict(served, np.ascontiguousarray(x_test[:, :, ::-1]))
    metrics["test_accuracy_mirrored"] = float(np.mean(mirrored["digit"].to_numpy() == y_test))
    metrics.update(agreement(served, x_test, probabilities, shifted))
    # Write
    out_dir.mkdir(parents=True, exist_ok=True)
    per_class(y_test, predicted).to_csv(out_dir / config.REPORT_FILE, index=False)
    save(confusion_figure(y_test, predicted), out_dir / config.CONFUSION_FILE)
    save(mistakes_figure(x_test, y_test, predicted, confidence), out_dir / config.MISTAKES_FILE)
    prediction_table(y_test, predicted, confidence).to_csv(out_dir / config.PREDICTIONS_FILE, index=False)
    return metrics


def agreement(
    served: mlflow.pyfunc.PyFuncModel, x: np.ndarray, probabilities: np.ndarray, shifted: np.ndarray
) -> dict:
    """How closely the served model (batch norms folded, some stages in bfloat16) follows the
    trained float32 Keras model it was made from, over the same views (the shifted copies too for
    the photos in the mask `shifted`): share of equal top-1 digits and the largest gap between
    probabilities. Empty for a pyfunc that is not ours."""
    python_model = served.unwrap_python_model()
    keras_file = getattr(python_model, "keras_file", None)
    if keras_file is None:
        return {}
    import keras

    from pipeline import serving

    trained = keras.saving.load_model(keras_file, compile=False)

    def keras_predict(batch):
        return np.asarray(trained.predict(batch, batch_size=config.PREDICT_CHUNK_SIZE, verbose=0))

    pixels = x.astype(np.float32)
    expected = keras_predict(pixels)
    if shifted.any():
        shift = python_model.test_time_shift
        expected[shifted] = serving.mean_over_views(keras_predict, pixels[shifted], shift)
    return {
        "served_top1_agreement": float(np.mean(expected.argmax(axis=1) == probabilities.argmax(axis=1))),
        "served_max_probability_gap": float(np.abs(expected - probabilities).max()),
    }


def check_split(x_test: np.ndarray, y_test: np.ndarray) -> None:
    """Raise PipelineError unless x is (n, h, w, 3) uint8 with n labels, n >= 1."""
    if x_test.ndim != 4 or x_test.shape[-1] != 3 or x_test.dtype != np.uint8:
        raise PipelineError(
            f"test images must be uint8 of shape (n, height, width, 3), got {x_test.dtype} {x_test.shape}"
        )
    if y_test.shape != (len(x_test),) or len(x_test) == 0:
        raise PipelineError(f"{len(x_test)} test images but labels of shape {y_test.shape}")


def load_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """The pyfunc at `model_uri`, or a PipelineError naming the URI."""
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as error:
        raise PipelineError(
            f"model URI {model_uri!r} does not load from {config.tracking_uri()} ({_message(error)}); "
            f"pass one of {_URI_FORMS}"
        ) from None


def predict(model: mlflow.pyfunc.PyFuncModel, x: np.ndarray, params: dict | None = None) -> pd.DataFrame:
    """The pyfunc's predictions for every image, in batches the served model accepts."""
    parts = [
        model.predict(pd.DataFrame({"image": list(x[start : start + config.MAX_PREDICT_BATCH])}), params)
        for start in range(0, len(x), config.MAX_PREDICT_BATCH)
    ]
    predictions = pd.concat(parts, ignore_index=True)
    if len(predictions) != len(x):
        raise PipelineError(f"the model returned {len(predictions)} predictions for {len(x)} images")
    return predictions


def score(y: np.ndarray, predicted: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy with its 95% interval, cross-entropy of the probabilities, macro F1 and the number
    of mistakes."""
    from pipeline import serving  # TensorFlow: imported by then to load the model

    low, high = accuracy_interval(int(np.sum(predicted == y)), len(y))
    return {
        "test_accuracy": float(np.mean(predicted == y)),
        "test_accuracy_ci95_low": low,
        "test_accuracy_ci95_high": high,
        "test_loss": serving.cross_entropy(probabilities, y),
        "macro_f1": float(f1_score(y, predicted, average="macro", zero_division=0)),
        "num_misclassified": int(np.sum(predicted != y)),
    }


def accuracy_interval(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of `correct` out of `total`: the true accuracies
    that result is consistent with. On 280 photos, 277 right (98.9%) gives 96.9-99.6%: a photo
    either way of a bar is within one test split's noise."""
    interval = binomtest(correct, total).proportion_ci(confidence, method="wilson")
    return float(interval.low), float(interval.high)


def per_class(y: np.ndarray, predicted: np.ndarray) -> pd.DataFrame:
    """Precision, recall, F1 and support for every digit (0 where undefined)."""
    digits = list(range(config.NUM_CLASSES))
    precision, recall, f1, support = precision_recall_fscore_support(
        y, predicted, labels=digits, zero_division=0
    )
    return pd.DataFrame(
        {"digit": digits, "precision": precision, "recall": recall, "f1": f1, "support": support}
    )


def prediction_table(y: np.ndarray, predicted: np.ndarray, confidence: np.ndarray) -> pd.DataFrame:
    """One row per test image: its index in the split, true and predicted digit, confidence."""
    return pd.DataFrame(
        {"index": np.arange(len(y)), "true": y, "predicted": predicted, "confidence": confidence}
    )


def mistakes(y: np.ndarray, predicted: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Indices of the misclassified images, most confident first."""
    wrong = np.flatnonzero(predicted != y)
    return wrong[np.argsort(-confidence[wrong], kind="stable")]


# Pictures


def confusion_figure(y: np.ndarray, predicted: np.ndarray) -> Figure:
    """Counts of true (rows) against predicted (columns) digits, each cell annotated."""
    digits = list(range(config.NUM_CLASSES))
    counts = confusion_matrix(y, predicted, labels=digits)
    figure = Figure(figsize=(6.5, 5.5))
    axes = figure.subplots()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes)
    for (row, column), value in np.ndenumerate(counts):
        colour = "white" if value > counts.max() / 2 else "black"
        axes.text(column, row, str(value), ha="center", va="center", color=colour, fontsize=9)
    axes.set(xticks=digits, yticks=digits, xlabel="predicted digit", ylabel="true digit")
    axes.set_title(f"Confusion matrix, {len(y)} test images ({np.mean(predicted == y):.2%} correct)")
    return figure


def mistakes_figure(x: np.ndarray, y: np.ndarray, predicted: np.ndarray, confidence: np.ndarray) -> Figure:
    """A gallery of misclassified images captioned "true 3 / predicted 5", or a note that there are none."""
    wrong = mistakes(y, predicted, confidence)
    if len(wrong) == 0:
        figure = Figure(figsize=(4, 1))
        figure.text(0.5, 0.5, f"No misclassified test images ({len(y)} of {len(y)} correct)", ha="center")
        return figure
    shown = wrong[:MAX_GALLERY]
    columns = min(GALLERY_COLUMNS, len(shown))
    rows = math.ceil(len(shown) / columns)
    figure = Figure(figsize=(1.6 * columns, 1.9 * rows + 0.5))
    for position, index in enumerate(shown):
        axes = figure.add_subplot(rows, columns, position + 1)
        axes.imshow(x[index])
        axes.set_title(
            f"true {y[index]} / predicted {predicted[index]}\nconfidence {confidence[index]:.2f}", fontsize=8
        )
        axes.axis("off")
    shown_note = (
        f"the {len(shown)} most confident shown" if len(shown) < len(wrong) else "most confident first"
    )
    figure.suptitle(f"{len(wrong)} of {len(y)} test images misclassified, {shown_note}")
    return figure


def save(figure: Figure, path: Path) -> None:
    """Render `figure` with the Agg canvas (no display, no global pyplot state) to `path`."""
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100, bbox_inches="tight")


# Promotion


def decide_promotion(
    candidate_accuracy: float, champion_accuracy: float | None, min_accuracy: float
) -> tuple[bool, str]:
    """Whether the candidate should become champion, and why, in words with the figures.

    It must reach `min_accuracy` and beat the champion strictly on the same test
    split; `champion_accuracy` is None when there is no champion.
    """
    if candidate_accuracy < min_accuracy:
        return False, (
            f"not promoted: test accuracy {candidate_accuracy:.4f} is below the minimum {min_accuracy:.4f}"
        )
    if champion_accuracy is None:
        return True, (
            f"promoted: test accuracy {candidate_accuracy:.4f} reaches the minimum {min_accuracy:.4f} "
            "and there is no champion yet"
        )
    if candidate_accuracy <= champion_accuracy:
        return False, (
            f"not promoted: test accuracy {candidate_accuracy:.4f} does not beat the champion's "
            f"{champion_accuracy:.4f} on the same test split"
        )
    return True, (
        f"promoted: test accuracy {candidate_accuracy:.4f} reaches the minimum {min_accuracy:.4f} "
        f"and beats the champion's {champion_accuracy:.4f} on the same test split"
    )


def judge(
    target: Target, accuracy: float, upstream: Run, min_accuracy: float, x: np.ndarray, y: np.ndarray
) -> tuple[bool, str]:
    """Score the current champion on the same split (`upstream`'s `x`, `y`) and decide whether to promote."""
    current = champion(target.name)
    if current is not None and str(current.version) == target.version:
        return False, f"not promoted: version {target.version} already is the {config.CHAMPION_ALIAS}"
    champion_accuracy = None
    if current is not None:
        champion_uri = f"models:/{current.name}/{current.version}"
        champion_accuracy = accuracy_of(champion_uri, x, y)
        warn_if_trained_elsewhere(current, upstream)
        mlflow.log_metric("champion_test_accuracy", champion_accuracy)
        mlflow.set_tag("pipeline.champion_version", str(current.version))
        log.info("champion %s scores test accuracy %.4f", champion_uri, champion_accuracy)
    promoted, reason = decide_promotion(accuracy, champion_accuracy, min_accuracy)
    if target.version is None:
        return False, (
            f"not promoted: {target.uri} is not a registered model version, so it is evaluated only "
            f"(register it and evaluate models:/<name>/<version> to promote it); on accuracy alone: {reason}"
        )
    return promoted, reason


def warn_if_trained_elsewhere(current: ModelVersion, upstream: Run) -> None:
    """A champion trained on another split may have trained on some of these test images."""
    trained_on = _tag(current.run_id, config.INGEST_RUN_TAG)
    if trained_on and trained_on != upstream.info.run_id:
        log.warning(
            "the champion (version %s) was trained on ingest run %s, not %s: some of these test images "
            "may have been in its training split, which inflates its score",
            current.version,
            trained_on,
            upstream.info.run_id,
        )


def accuracy_of(model_uri: str, x: np.ndarray, y: np.ndarray) -> float:
    """The test accuracy of the pyfunc at `model_uri`, without writing any report."""
    predicted = predict(load_model(model_uri), x)["digit"].to_numpy(dtype=np.int64)
    return float(np.mean(predicted == y))


def champion(name: str) -> ModelVersion | None:
    """The version of `name` holding the champion alias, or None."""
    try:
        return MlflowClient().get_model_version_by_alias(name, config.CHAMPION_ALIAS)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def record(target: Target, metrics: dict[str, float], promoted: bool, reason: str) -> None:
    """Tag the run and the model version; move the alias when promoted."""
    mlflow.set_tags({"pipeline.promoted": str(promoted).lower(), "pipeline.promotion_reason": reason})
    if target.version is None:
        log.info("%s: %s", target.uri, reason)
        return
    client = MlflowClient()
    client.set_model_version_tag(
        target.name, target.version, "test_accuracy", f"{metrics['test_accuracy']:.4f}"
    )
    if promoted:
        client.set_registered_model_alias(target.name, config.CHAMPION_ALIAS, target.version)
    log.info("%s version %s: %s", target.name, target.version, reason)


# Resolving the model and the test split


def resolve(model_uri: str, model_name: str) -> Target:
    """The model to evaluate: the latest version of `model_name` when `model_uri` is empty.

    Registered versions and aliases are pinned to `models:/<name>/<version>`;
    other URIs are evaluated but cannot be promoted.
    """
    client = MlflowClient()
    if not model_uri:
        version = latest_version(model_name)
    elif match := _VERSION_URI.fullmatch(model_uri):
        version = _registry(lambda: client.get_model_version(match["name"], match["version"]), model_uri)
    elif match := _ALIAS_URI.fullmatch(model_uri):
        version = _registry(
            lambda: client.get_model_version_by_alias(match["name"], match["alias"]), model_uri
        )
    else:
        check_local(model_uri)
        return Target(model_uri, model_name, None, source_run(model_uri))
    number = str(version.version)  # the registry answers int or str depending on the call
    return Target(f"models:/{version.name}/{number}", version.name, number, version.run_id)


def latest_version(name: str) -> ModelVersion:
    """The highest version of registered model `name`."""
    try:
        versions = MlflowClient().search_model_versions(f"name = '{name}'")
    except MlflowException as error:
        raise PipelineError(
            f"--model-name {name!r}: cannot search the registry ({_message(error)})"
        ) from None
    if not versions:
        raise PipelineError(
            f"--model-name {name!r}: the registry at {config.tracking_uri()} has no versions of this "
            "model; run the train stage first, or pass --model-uri"
        )
    return max(versions, key=lambda version: int(version.version))


def check_local(model_uri: str) -> None:
    """A URI without a scheme (or a file: URI) is a local folder: PipelineError when it is missing."""
    parsed = urllib.parse.urlparse(model_uri)
    if len(parsed.scheme) > 1 and parsed.scheme != "file":  # one letter: a Windows drive
        return
    path = Path(parsed.path if parsed.scheme == "file" else model_uri).expanduser()
    if not path.exists():
        raise PipelineError(
            f"--model-uri {model_uri!r}: {path} does not exist; pass one of {_URI_FORMS}, a model "
            "folder, or leave it empty for the latest version of --model-name"
        )


def source_run(model_uri: str) -> str | None:
    """The run that logged the model at an unregistered URI, when the URI says."""
    if match := _RUN_URI.fullmatch(model_uri):
        return _registry(lambda: mlflow.get_run(match["run_id"]), model_uri).info.run_id
    if match := _LOGGED_URI.fullmatch(model_uri):
        return _registry(lambda: mlflow.get_logged_model(match["model_id"]), model_uri).source_run_id
    return None


def _registry(call, model_uri: str):
    try:
        return call()
    except MlflowException as error:
        raise PipelineError(
            f"--model-uri {model_uri!r} does not resolve in {config.tracking_uri()} ({_message(error)}); "
            f"pass one of {_URI_FORMS}, or leave it empty for the latest version of --model-name"
        ) from None


def _message(error: Exception) -> str:
    return getattr(error, "message", None) or str(error)


def ingest_run(ingest_run_id: str, target: Target):
    """The ingest run to test on: the given one, the one the model was trained on, or the latest."""
    if ingest_run_id:
        return tracking.upstream_run("ingest", ingest_run_id)
    tagged = _tag(target.source_run_id, config.INGEST_RUN_TAG)
    if not tagged:
        log.info("the model's source run names no ingest run; testing on the latest finished one")
        return tracking.find_run("ingest", "")
    try:
        return tracking.find_run("ingest", tagged)
    except PipelineError as error:
        raise PipelineError(
            f"the model's source run {target.source_run_id} names ingest run {tagged}, but: {error}; "
            "pass --ingest-run-id"
        ) from None


def _tag(run_id: str | None, key: str) -> str:
    if not run_id:
        return ""
    try:
        return mlflow.get_run(run_id).data.tags.get(key, "")
    except MlflowException:
        log.warning("the model's source run %s is gone; cannot tell which ingest run it used", run_id)
        return ""


# Command line


def parse_args(argv: list[str] | None):
    parser = cli.parser("evaluate", __doc__.splitlines()[0])
    parser.add_argument(
        "--model-uri", default="", help=f"{_URI_FORMS} (default: the latest version of --model-name)"
    )
    parser.add_argument(
        "--model-name", type=cli.model_name, default=config.MODEL_NAME, help="registered model name"
    )
    parser.add_argument(
        "--ingest-run-id", default="", help="ingest run to test on (default: the model's, else the latest)"
    )
    parser.add_argument(
        "--min-accuracy", type=cli.unit_interval, default=config.MIN_ACCURACY, help="needed to be promoted"
    )
    return parser.parse_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tracking.configure()
    target = resolve(args.model_uri, args.model_name)
    upstream = ingest_run(args.ingest_run_id, target)
    with tracking.stage_run("evaluate", vars(args)), tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tags(
            {
                "pipeline.model_uri": target.uri,
                config.MODEL_VERSION_TAG: target.version or "",
                config.INGEST_RUN_TAG: upstream.info.run_id,
            }
        )
        arrays = ingest.load(tracking.download(upstream, config.INGEST_ARTIFACT))
        x, y = arrays["x_test"], arrays["y_test"]
        # Evaluate
        out_dir = Path(tmp) / config.EVALUATE_ARTIFACT
        metrics = run(target.uri, x, y, out_dir)
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(out_dir), artifact_path=config.EVALUATE_ARTIFACT)
        log.info("%s on ingest run %s: %s", target.uri, upstream.info.run_id, _figures(metrics))
        # Promote
        promoted, reason = judge(target, metrics["test_accuracy"], upstream, args.min_accuracy, x, y)
        record(target, metrics, promoted, reason)


def _figures(metrics: dict[str, float]) -> str:
    return ", ".join(
        f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
        for key, value in metrics.items()
    )


if __name__ == "__main__":
    cli.run(main)
