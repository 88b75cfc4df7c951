"""The evaluate stage: metrics and pictures of a served model, and who becomes champion.

The models are tiny and hand-set, so their accuracy is known in advance: the
generated photos (conftest.photo_bytes) have a mean red value of about 25 * digit,
so a softmax over the mean colour with the right weights reads the digit off it.
"""

import math

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import expected_probabilities, shift_sensitive_classifier
from PIL import Image
from sklearn.metrics import f1_score

from pipeline import config, evaluate, ingest, serving
from pipeline.errors import PipelineError

DIGITS = np.arange(config.NUM_CLASSES)
CENTRES = 25 * DIGITS / 255  # mean red of digit k's photos, after Rescaling(1/255)
EVALUATION_FILES = {
    config.REPORT_FILE,
    config.CONFUSION_FILE,
    config.MISTAKES_FILE,
    config.PREDICTIONS_FILE,
}


# Tiny models with known behaviour


def mean_colour_model(kernel: np.ndarray, bias: np.ndarray) -> keras.Model:
    """Softmax over an image's mean RGB (in 0..1) with the given Dense weights."""
    inputs = keras.Input((config.IMAGE_SIZE, config.IMAGE_SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(config.NUM_CLASSES, activation="softmax")(pooled))
    model.layers[-1].set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return model


def constant_model(digit: int) -> keras.Model:
    """Says `digit` for every photo (right on one test image per digit: accuracy 0.1)."""
    return mean_colour_model(np.zeros((3, config.NUM_CLASSES)), 10.0 * (DIGITS == digit))


def colour_model(known=DIGITS, sharpness: float = 2000.0) -> keras.Model:
    """Picks the nearest known digit's red centre: -s (r - c)^2 up to a term shared by all classes."""
    kernel = np.zeros((3, config.NUM_CLASSES))
    kernel[0] = 2 * sharpness * CENTRES
    bias = np.where(np.isin(DIGITS, known), -sharpness * CENTRES**2, -1e4)
    return mean_colour_model(kernel, bias)


def register(model: keras.Model, ingest_run_id: str = "", name: str | None = config.MODEL_NAME):
    """Log `model` the way the train stage does: a train run tagged with its ingest run."""
    mlflow.set_experiment("tests")
    with mlflow.start_run():
        mlflow.set_tags({config.STAGE_TAG: "train", config.INGEST_RUN_TAG: ingest_run_id})
        return serving.log_model(model, registered_model_name=name)


def ingest_run_id(source, seed: int = config.SEED) -> str:
    ingest.main(["--source", str(source), "--seed", str(seed)])
    return stage_runs("ingest")[0].info.run_id


def only_run(stage: str):
    runs = stage_runs(stage)
    assert len(runs) == 1
    return runs[0]


def stage_runs(stage: str = "evaluate"):
    return mlflow.search_runs(
        experiment_names=["tests"],
        filter_string=f"tags.`{config.STAGE_TAG}` = '{stage}'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )


def champion_version(name: str = config.MODEL_NAME) -> str | None:
    aliases = mlflow.MlflowClient().get_registered_model(name).aliases
    return None if config.CHAMPION_ALIAS not in aliases else str(aliases[config.CHAMPION_ALIAS])


@pytest.fixture
def test_split(tmp_path, dataset_dir):
    """The test split ingest makes of the generated photos: one image per digit."""
    arrays = ingest.run(str(dataset_dir), tmp_path / "ingested", data_dir=tmp_path / "cache").arrays
    return arrays["x_test"], arrays["y_test"]


# decide_promotion


@pytest.mark.parametrize(
    ("candidate", "champion", "minimum", "promoted", "figures"),
    [
        (0.95, None, 0.99, False, ["0.9500", "0.9900"]),
        (0.95, 0.90, 0.99, False, ["0.9500", "0.9900"]),
        (0.995, None, 0.99, True, ["0.9950", "0.9900", "no champion"]),
        (0.99, None, 0.99, True, ["0.9900"]),
        (0.995, 0.995, 0.99, False, ["0.9950", "does not beat"]),
        (0.995, 0.998, 0.99, False, ["0.9950", "0.9980"]),
        (0.998, 0.995, 0.99, True, ["0.9980", "0.9950", "beats"]),
        (0.1, None, 0.0, True, ["0.1000", "0.0000"]),
        (1.0, 1.0, 1.0, False, ["1.0000"]),
    ],
)
def test_decide_promotion(candidate, champion, minimum, promoted, figures):
    decision, reason = evaluate.decide_promotion(candidate, champion, minimum)
    assert decision is promoted
    assert reason.startswith("promoted" if promoted else "not promoted")
    for figure in figures:
        assert figure in reason


def wilson(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval, written out (Wilson 1927)."""
    share = correct / total
    centre = (share + z**2 / (2 * total)) / (1 + z**2 / total)
    half = z * math.sqrt(share * (1 - share) / total + z**2 / (4 * total**2)) / (1 + z**2 / total)
    return centre - half, centre + half


@pytest.mark.parametrize("correct, total", [(5, 10), (277, 280), (280, 280), (0, 3)])
def test_accuracy_interval_is_the_wilson_interval(correct, total):
    low, high = evaluate.accuracy_interval(correct, total)
    assert (low, high) == pytest.approx(wilson(correct, total), abs=1e-6)
    assert 0 <= low <= correct / total <= high <= 1


def test_accuracy_interval_of_a_perfect_score_on_280_photos_reaches_below_99_percent():
    # Why the interval is logged: 280 of 280 right cannot tell a 99% model from a perfect one.
    low, high = evaluate.accuracy_interval(280, 280)
    assert high == pytest.approx(1.0)
    assert low == pytest.approx(280 / (280 + 1.959964**2)) and low < 0.99


# run


def test_run_metrics_agree_with_the_pyfunc_predictions(mlflow_store, test_split, tmp_path):
    x, y = test_split
    # Knows digits 0-4 only, softly: 5-9 come out as 4, with spread-out probabilities.
    info = register(colour_model(known=range(5), sharpness=200.0), name=None)
    metrics = evaluate.run(info.model_uri, x, y, tmp_path / "out")

    direct = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"image": list(x)}))
    predicted = direct["digit"].to_numpy()
    probabilities = direct[[f"p{k}" for k in DIGITS]].to_numpy()
    assert metrics["test_accuracy"] == pytest.approx(np.mean(predicted == y)) == pytest.approx(0.5)
    expected_loss = -np.mean(np.log(np.clip(probabilities[np.arange(len(y)), y], 1e-7, 1)))
    assert metrics["test_loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert metrics["macro_f1"] == pytest.approx(f1_score(y, predicted, average="macro", zero_division=0))
    assert metrics["num_misclassified"] == (predicted != y).sum() == 5
    assert (metrics["test_accuracy_ci95_low"], metrics["test_accuracy_ci95_high"]) == pytest.approx(
        wilson(int((predicted == y).sum()), len(y))
    )

    out = tmp_path / "out"
    assert {path.name for path in out.iterdir()} == EVALUATION_FILES
    assert all((out / name).stat().st_size > 0 for name in EVALUATION_FILES)
    table = pd.read_csv(out / config.PREDICTIONS_FILE)
    assert list(table.columns) == ["index", "true", "predicted", "confidence"]
    assert (table["predicted"] != table["true"]).sum() == (predicted != y).sum()
    np.testing.assert_allclose(table["confidence"], direct["confidence"], rtol=1e-6)
    report = pd.read_csv(out / config.REPORT_FILE).set_index("digit")
    assert list(report.columns) == ["precision", "recall", "f1", "support"]
    assert report["support"].tolist() == [1] * 10
    assert report.loc[:4, "recall"].tolist() == [1.0] * 5 and report.loc[5:, "recall"].sum() == 0


def test_the_served_answers_are_compared_over_the_views_the_served_model_used(mlflow_store, tmp_path):
    """Shifted copies for the photos below the confidence gate, the photo alone for the others."""
    model = shift_sensitive_classifier()
    x = np.random.default_rng(0).integers(0, 256, (8, config.IMAGE_SIZE, config.IMAGE_SIZE, 3), np.uint8)
    single = expected_probabilities(model, x, shift=0)
    unsure = single.max(axis=1) < config.TEST_TIME_GATE
    assert unsure.any() and not unsure.all()
    info = register(model, name=None)
    metrics = evaluate.run(info.model_uri, x, single.argmax(axis=1), tmp_path / "out")
    assert metrics["test_share_shifted"] == unsure.mean()
    assert metrics["test_accuracy_single_view"] == 1.0
    assert metrics["served_top1_agreement"] == 1.0 and metrics["served_max_probability_gap"] < 1e-5
    mirrored = expected_probabilities(model, x[:, :, ::-1]).argmax(axis=1) == single.argmax(axis=1)
    assert metrics["test_accuracy_mirrored"] == mirrored.mean() < 1.0


def test_run_on_a_perfect_model_draws_a_note_instead_of_a_gallery(mlflow_store, test_split, tmp_path):
    x, y = test_split
    info = register(colour_model(), name=None)
    metrics = evaluate.run(info.model_uri, x, y, tmp_path / "out")
    assert metrics["test_accuracy"] == 1.0 and metrics["num_misclassified"] == 0
    assert metrics["macro_f1"] == 1.0 and metrics["test_loss"] < 1e-3
    assert metrics["served_top1_agreement"] == 1.0 and metrics["served_max_probability_gap"] < 1e-5
    assert metrics["test_accuracy_single_view"] == 1.0  # a mean colour does not move with a shift
    assert metrics["test_accuracy_mirrored"] == 1.0  # nor with a mirror
    with Image.open(tmp_path / "out" / config.MISTAKES_FILE) as note:
        assert note.height < 200


def test_run_refuses_labels_that_do_not_match_the_images(tmp_path):
    x = np.zeros((3, 64, 64, 3), np.uint8)
    with pytest.raises(PipelineError, match="3 test images but labels of shape"):
        evaluate.run("models:/unused/1", x, np.zeros(2, np.int64), tmp_path)


@pytest.mark.parametrize("wrong", [0, 1, 7, evaluate.MAX_GALLERY + 5])
def test_gallery_shows_each_mistake_most_confident_first(wrong):
    rng = np.random.default_rng(wrong)
    n = evaluate.MAX_GALLERY + 10
    x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    predicted = y.copy()
    predicted[:wrong] = (y[:wrong] + 1) % 10
    confidence = rng.random(n)

    order = evaluate.mistakes(y, predicted, confidence)
    assert len(order) == (predicted != y).sum() == wrong
    assert np.all(np.diff(confidence[order]) <= 0)
    figure = evaluate.mistakes_figure(x, y, predicted, confidence)
    pictures = [axes for axes in figure.axes if axes.images]
    assert len(pictures) == min(wrong, evaluate.MAX_GALLERY)
    if wrong:
        first = order[0]
        assert pictures[0].get_title().startswith(f"true {y[first]} / predicted {predicted[first]}")
    else:
        assert "No misclassified" in figure.texts[0].get_text()


# main


def test_main_promotes_the_first_version_then_only_a_better_one(mlflow_store, dataset_dir, caplog):
    caplog.set_level("INFO", logger="pipeline")
    upstream = ingest_run_id(dataset_dir)
    client = mlflow.MlflowClient()

    register(constant_model(3), upstream)
    evaluate.main(["--min-accuracy", "0"])
    first = only_run("evaluate")
    assert first.info.status == "FINISHED"
    assert first.data.tags["pipeline.promoted"] == "true"
    assert first.data.tags["pipeline.model_uri"] == f"models:/{config.MODEL_NAME}/1"
    assert first.data.tags[config.MODEL_VERSION_TAG] == "1"
    assert first.data.tags[config.INGEST_RUN_TAG] == upstream
    assert first.data.metrics["test_accuracy"] == pytest.approx(0.1)
    assert "champion_test_accuracy" not in first.data.metrics
    logged = client.list_artifacts(first.info.run_id, config.EVALUATE_ARTIFACT)
    assert {item.path.split("/")[-1] for item in logged} == EVALUATION_FILES
    assert champion_version() == "1"

    # Equal is not better: the alias stays where it is. Version 2 comes from another split,
    # which the champion may have trained on: that is worth a warning.
    other_split = ingest_run_id(dataset_dir, seed=7)
    register(constant_model(5), other_split)
    caplog.clear()
    evaluate.main(["--min-accuracy", "0"])
    second = stage_runs()[0]
    assert second.data.tags[config.INGEST_RUN_TAG] == other_split
    assert f"was trained on ingest run {upstream}, not {other_split}" in caplog.text
    assert second.data.tags[config.MODEL_VERSION_TAG] == "2"
    assert second.data.tags["pipeline.promoted"] == "false"
    reason = second.data.tags["pipeline.promotion_reason"]
    assert "does not beat the champion's 0.1000" in reason
    assert reason in caplog.text
    assert second.data.metrics["champion_test_accuracy"] == pytest.approx(0.1)
    assert client.get_model_version(config.MODEL_NAME, "2").tags["test_accuracy"] == "0.1000"
    assert champion_version() == "1"

    # A better version with the default minimum takes the alias.
    register(colour_model(), upstream)
    evaluate.main([])
    third = stage_runs()[0]
    assert third.data.tags["pipeline.promoted"] == "true"
    assert third.data.metrics["test_accuracy"] == 1.0
    assert champion_version() == "3"

    # The champion itself, named by its alias, is not compared with itself.
    evaluate.main(["--model-uri", f"models:/{config.MODEL_NAME}@{config.CHAMPION_ALIAS}"])
    again = stage_runs()[0]
    assert again.data.tags["pipeline.model_uri"] == f"models:/{config.MODEL_NAME}/3"
    assert "already is the champion" in again.data.tags["pipeline.promotion_reason"]
    assert champion_version() == "3"


def test_main_promotes_nothing_below_the_minimum_or_unregistered(mlflow_store, dataset_dir, caplog):
    caplog.set_level("INFO", logger="pipeline")
    upstream = ingest_run_id(dataset_dir)
    register(constant_model(0), upstream)
    evaluate.main(["--min-accuracy", "1.0"])
    run = stage_runs()[0]
    assert run.data.tags["pipeline.promoted"] == "false"
    assert "below the minimum 1.0000" in run.data.tags["pipeline.promotion_reason"]
    assert champion_version() is None

    # A perfect model that is not a registered version is evaluated, never promoted.
    unregistered = register(colour_model(), name=None)
    evaluate.main(["--model-uri", unregistered.model_uri, "--min-accuracy", "0"])
    run = stage_runs()[0]
    assert run.data.metrics["test_accuracy"] == 1.0
    assert run.data.tags["pipeline.promoted"] == "false"
    assert run.data.tags[config.MODEL_VERSION_TAG] == ""
    assert "is not a registered model version" in caplog.text
    assert "names no ingest run" in caplog.text  # untagged source run: the latest ingest run
    assert run.data.tags[config.INGEST_RUN_TAG] == upstream
    assert champion_version() is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model-name", "nope"], "--model-name 'nope': the registry at"),
        (["--model-uri", "models:/nope/3"], "--model-uri 'models:/nope/3' does not resolve"),
        (["--model-uri", "models:/nope@champion"], "--model-uri 'models:/nope@champion' does not resolve"),
        (["--model-uri", "runs:/0123abc/model"], "--model-uri 'runs:/0123abc/model' does not resolve"),
        (["--model-uri", "models:/m-0123abc"], "--model-uri 'models:/m-0123abc' does not resolve"),
        (["--model-uri", "nowhere/model"], "--model-uri 'nowhere/model': nowhere/model does not exist"),
    ],
)
def test_unknown_models_exit_2_naming_them_before_any_run(mlflow_store, caplog, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2
    assert message in caplog.text
    assert "Traceback" not in caplog.text
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_folder_that_is_not_a_model_fails_the_run_naming_it(mlflow_store, dataset_dir, tmp_path, caplog):
    ingest_run_id(dataset_dir)
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model-uri", str(tmp_path / "not-a-model")])
    assert exit_info.value.code == 2
    assert "not-a-model' does not load" in caplog.text
    assert only_run("evaluate").info.status == "FAILED"


def test_unknown_ingest_run_exits_2_naming_it(mlflow_store, dataset_dir, caplog):
    ingest_run_id(dataset_dir)
    register(constant_model(0), "deleted0ingest0run")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([])
    assert exit_info.value.code == 2
    assert "names ingest run deleted0ingest0run" in caplog.text and "--ingest-run-id" in caplog.text
    caplog.clear()
    with pytest.raises(SystemExit):
        evaluate.main(["--ingest-run-id", "missing0run"])
    assert "run id 'missing0run' does not exist" in caplog.text


def test_min_accuracy_outside_0_1_is_refused_before_any_run(mlflow_store, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--min-accuracy", "1.5"])
    assert exit_info.value.code == 2
    assert "--min-accuracy: must lie between 0 and 1" in capsys.readouterr().err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
