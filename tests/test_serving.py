"""The served pyfunc: what log_model stores, the inputs predict takes and the errors it gives."""

import base64
import io
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import (
    b64,
    bomb_png,
    expected_probabilities,
    photo_bytes,
    shift_sensitive_classifier,
    sqlite_store,
    tiny_classifier,
)
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType
from PIL import Image

from pipeline import config, fitting, images, serving
from pipeline.errors import PipelineError

COLUMNS = ["digit", "confidence", *(f"p{k}" for k in range(config.NUM_CLASSES))]
PROBABILITIES = COLUMNS[2:]


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def pixels(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module", autouse=True)
def temp_files_in_tmp(tmp_path_factory):
    """MLflow and log_model write temporary files; keep them under pytest's tmp path."""
    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("tmp"))
    yield
    tempfile.tempdir = previous


@pytest.fixture(scope="module")
def keras_model() -> keras.Model:
    return tiny_classifier()


@pytest.fixture(scope="module")
def served(tmp_path_factory, keras_model):
    """The tiny model logged, registered and loaded back as a pyfunc, once for the module."""
    root = tmp_path_factory.mktemp("store")
    with sqlite_store(root):
        experiment = mlflow.create_experiment("serving", artifact_location=(root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            serving.log_model(keras_model, "tiny-digits", example_image=photo_bytes(3, 0))
        return mlflow.pyfunc.load_model("models:/tiny-digits/1")


@pytest.fixture(scope="module")
def python_model(served) -> serving.SignDigitsModel:
    return served.unwrap_python_model()


# log_model


def test_log_model_registers_a_version_that_loads_by_number_and_alias(mlflow_store, keras_model):
    with mlflow.start_run():
        info = serving.log_model(keras_model, "digits")
    assert info.registered_model_version == 1
    assert info.model_uri.startswith("models:/m-")
    MlflowClient().set_registered_model_alias("digits", config.CHAMPION_ALIAS, "1")
    photo = [b64(photo_bytes(5, 1))]
    by_version = mlflow.pyfunc.load_model("models:/digits/1").predict(photo)
    by_alias = mlflow.pyfunc.load_model(f"models:/digits@{config.CHAMPION_ALIAS}").predict(photo)
    pd.testing.assert_frame_equal(by_version, by_alias)
    assert list(by_alias.columns) == COLUMNS


def test_log_model_stores_an_uncompiled_keras_file_code_and_pinned_requirements(
    mlflow_store, tmp_path, keras_model
):
    with mlflow.start_run():
        info = serving.log_model(keras_model, registered_model_name=None)
    assert info.registered_model_version is None
    folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    with zipfile.ZipFile(folder / "artifacts" / serving.KERAS_FILE) as archive:
        assert not json.loads(archive.read("config.json"))["compile_config"]  # no optimizer
    assert (folder / "code" / "pipeline" / "images.py").is_file()
    requirements = (folder / "requirements.txt").read_text().split()
    assert f"tensorflow=={metadata.version('tensorflow')}" in requirements
    assert not any(name.startswith("keras-tuner") for name in requirements)


def test_a_trained_model_is_logged_without_its_optimizer(mlflow_store, tmp_path):
    """train logs a compiled model whose optimizer has state: none of it belongs in the served file."""
    import h5py

    model = tiny_classifier()
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.fit(np.zeros((4, 64, 64, 3)), np.eye(10)[:4], epochs=1, verbose=0)
    assert model.optimizer.built
    with mlflow.start_run():
        info = serving.log_model(model, registered_model_name=None)
    folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    with zipfile.ZipFile(folder / "artifacts" / serving.KERAS_FILE) as archive:
        assert not json.loads(archive.read("config.json"))["compile_config"]
        archive.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as weights:
        assert "optimizer" not in weights, "Adam's moments were stored with the served weights"


def test_is_float32_uncompiled_is_true_only_for_what_float32_copy_makes():
    # log_model copies a model only when this is false.
    model = tiny_classifier()
    assert serving.is_float32_uncompiled(model)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = tiny_classifier()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert not serving.is_float32_uncompiled(mixed)
    assert serving.is_float32_uncompiled(serving.float32_copy(mixed))
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    assert not serving.is_float32_uncompiled(model)
    assert serving.is_float32_uncompiled(serving.float32_copy(model))


def test_log_model_needs_an_active_run(mlflow_store, keras_model):
    with pytest.raises(PipelineError, match="active MLflow run"):
        serving.log_model(keras_model)


def test_signature_takes_one_column_of_anything_and_example_is_a_base64_photo(served):
    signature = served.metadata.signature
    assert signature.inputs == Schema([ColSpec(AnyType())])
    assert signature.outputs.input_names() == COLUMNS
    assert [t.name for t in signature.outputs.input_types()] == ["long"] + ["double"] * 11
    example = served.input_example
    assert list(example.columns) == ["image"]
    assert base64.b64decode(example["image"][0]) == photo_bytes(3, 0)
    assert len(served.predict(example)) == 1


def test_default_example_is_a_mid_grey_png():
    image = Image.open(io.BytesIO(serving.grey_png()))
    assert (image.format, image.size, image.getpixel((10, 10))) == ("PNG", (64, 64), (128, 128, 128))


# predict: input forms


def test_arrays_of_any_size_in_a_dataframe_column(served, keras_model):
    photos = [
        pixels((100, 100, 3)),
        pixels((30, 50, 3), 1),
        pixels((64, 64), 2),
        pixels((40, 40, 4), 3),
        pixels((70, 60, 3), 4).astype(np.float64) * 0.75 + 0.25,
        pixels((64, 64, 1), 5),
    ]
    result = served.predict(pd.DataFrame({"image": photos}))
    reference = np.stack([images.preprocess_array(photo) for photo in photos])
    np.testing.assert_allclose(
        result[PROBABILITIES], expected_probabilities(keras_model, reference), atol=1e-5
    )


def test_output_columns_dtypes_and_probabilities(served):
    result = served.predict([photo_bytes(label, 0) for label in range(4)])
    assert list(result.columns) == COLUMNS
    assert result["digit"].dtype == np.int64
    assert all(result[column].dtype == np.float64 for column in COLUMNS[1:])
    probabilities = result[PROBABILITIES].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(result["digit"], probabilities.argmax(axis=1))
    np.testing.assert_array_equal(result["confidence"], probabilities.max(axis=1))


@pytest.mark.parametrize(
    "encode",
    [
        lambda data: base64.b64encode(data).decode(),
        lambda data: base64.urlsafe_b64encode(data).decode(),
        lambda data: base64.urlsafe_b64encode(data).decode().rstrip("="),
        lambda data: base64.b64encode(data).decode().rstrip("="),
        lambda data: "data:image/jpeg;base64," + base64.b64encode(data).decode(),
        lambda data: base64.encodebytes(data).decode(),  # MIME: line breaks every 76 characters
    ],
    ids=["standard", "url-safe", "url-safe-unpadded", "unpadded", "data-url", "mime-lines"],
)
def test_base64_forms_give_the_same_answer_as_the_bytes(served, encode):
    # photo 7 has bytes '+' and '/' in standard base64 and '-' '_' in URL-safe
    photos = [photo_bytes(label, 7, size=40) for label in range(3)]
    assert any(c in b64(photo) for photo in photos for c in "+/")
    pd.testing.assert_frame_equal(served.predict([encode(photo) for photo in photos]), served.predict(photos))


def test_jpeg_bytes_list_dict_and_column_agree(served, keras_model):
    photos = [photo_bytes(label, 2) for label in range(5)]
    by_list = served.predict(photos)
    reference = np.stack([images.preprocess(photo) for photo in photos])
    np.testing.assert_allclose(
        by_list[PROBABILITIES], expected_probabilities(keras_model, reference), atol=1e-5
    )
    for same in (
        {"image": photos},
        {"image": [b64(photo) for photo in photos]},
        pd.DataFrame({"photo": photos}),
        pd.DataFrame({"b64": [b64(photo) for photo in photos]}),
    ):
        pd.testing.assert_frame_equal(served.predict(same), by_list)


def test_nested_lists_in_a_dataframe_column_match_arrays(served):
    photos = [pixels((48, 40, 3)), pixels((50, 50), 1)]
    by_lists = served.predict(pd.DataFrame({"image": [photo.tolist() for photo in photos]}))
    pd.testing.assert_frame_equal(by_lists, served.predict(pd.DataFrame({"image": photos})))


def test_4d_batches_and_lists_of_arrays_work_on_the_python_model(served, python_model):
    batch = pixels((3, 80, 80, 3))
    by_column = served.predict(pd.DataFrame({"image": list(batch)}))
    pd.testing.assert_frame_equal(python_model.predict(None, batch), by_column)
    pd.testing.assert_frame_equal(python_model.predict(None, list(batch)), by_column)


def test_pyfunc_schema_check_refuses_bare_arrays_so_send_a_dataframe_column(served):
    batch = pixels((2, 64, 64, 3))
    for bare in (batch, list(batch), pixels((1, 16, 16, 3, 1))):
        with pytest.raises(MlflowException, match="Failed to enforce schema") as raised:
            served.predict(bare)
        assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


def test_batch_is_chunked_in_order(python_model):
    photos = [pixels((64, 64, 3), seed) for seed in range(2 * config.PREDICT_CHUNK_SIZE + 3)]
    together = python_model.predict(None, photos)
    picked = [0, config.PREDICT_CHUNK_SIZE, len(photos) - 1]  # one from each chunk
    one_by_one = pd.concat([python_model.predict(None, [photos[i]]) for i in picked], ignore_index=True)
    pd.testing.assert_frame_equal(together.iloc[picked].reset_index(drop=True), one_by_one, atol=1e-6)


def test_the_network_is_compiled_once_for_every_batch_size(python_model):
    compiled = list(python_model.network.models)
    for count in (1, 5, 2 * config.PREDICT_CHUNK_SIZE + 3):
        python_model.predict(None, [pixels((64, 64, 3), seed) for seed in range(count)])
    assert python_model.network.models == compiled
    assert all(model.input().get_partial_shape()[0].is_dynamic for model in compiled)


def test_requests_from_several_threads_get_the_answers_of_one_at_a_time(python_model):
    batches = [[pixels((64, 64, 3), 10 * thread + seed) for seed in range(9)] for thread in range(4)]
    alone = [python_model.predict(None, batch) for batch in batches]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            together = list(pool.map(lambda batch: python_model.predict(None, batch), batches))
            for expected, got in zip(alone, together, strict=True):
                pd.testing.assert_frame_equal(got, expected)


# test-time augmentation


def test_unsure_photos_average_five_shifted_views_unless_a_request_turns_it_off(mlflow_store):
    model = shift_sensitive_classifier()
    with mlflow.start_run():
        info = serving.log_model(model, "shifty")
    served = mlflow.pyfunc.load_model(info.model_uri)
    photos = [pixels((64, 64, 3), seed) for seed in range(6)]
    batch = serving.build_batch(photos)
    single = expected_probabilities(model, batch, shift=0)
    averaged = expected_probabilities(model, batch, gate=None)
    assert np.abs(averaged - single).max(axis=1).min() > 1e-2  # the views matter to this model
    unsure = single.max(axis=1) < config.TEST_TIME_GATE
    assert unsure.any() and not unsure.all()  # confidences 0.52, 0.27, 0.94, 0.87, 0.39, 0.54
    frame = pd.DataFrame({"image": photos})
    answers = served.predict(frame)[PROBABILITIES].to_numpy()
    np.testing.assert_allclose(answers[unsure], averaged[unsure], atol=1e-5)
    np.testing.assert_allclose(answers[~unsure], single[~unsure], atol=1e-5)
    off = served.predict(frame, params={serving.TEST_TIME_AUGMENTATION: False})
    np.testing.assert_allclose(off[PROBABILITIES], single, atol=1e-5)
    on = served.predict(frame, params={serving.TEST_TIME_AUGMENTATION: True})
    np.testing.assert_allclose(on[PROBABILITIES], answers, atol=1e-6)
    sure = [photo for photo, flag in zip(photos, unsure) if not flag]  # no photo to shift
    np.testing.assert_allclose(
        served.predict(pd.DataFrame({"image": sure}))[PROBABILITIES], single[~unsure], atol=1e-5
    )


def test_the_shifted_copies_go_to_the_network_a_chunk_at_a_time():
    sizes = []

    def unsure_of_everything(batch):
        sizes.append(len(batch))
        return np.full((len(batch), config.NUM_CLASSES), 1 / config.NUM_CLASSES)

    photos = np.zeros((config.PREDICT_CHUNK_SIZE, 8, 8, 3), np.uint8)
    probabilities = serving.mean_over_views(unsure_of_everything, photos, shift=1, gate=0.8)
    assert sizes == [config.PREDICT_CHUNK_SIZE] * 5  # the photos, then their four shifted copies
    np.testing.assert_allclose(probabilities, 1 / config.NUM_CLASSES)


def test_the_shift_is_served_only_when_it_lowers_the_validation_loss():
    model = shift_sensitive_classifier()
    photos = np.stack([pixels((64, 64, 3), seed) for seed in range(6)])
    alone = expected_probabilities(model, photos, shift=0)
    shifted = expected_probabilities(model, photos)
    assert np.flatnonzero(alone.argmax(axis=1) != shifted.argmax(axis=1)).size == 2  # two digits change

    def expected(labels):
        labels = np.asarray(labels)
        errors = [int((p.argmax(axis=1) != labels).sum()) for p in (alone, shifted)]
        losses = [-np.log(p[np.arange(len(labels)), labels]).mean() for p in (alone, shifted)]
        return errors, losses

    network = serving.ServedNetwork(model)

    def choice(labels, **options):
        labels = np.asarray(labels)
        shift, scores = serving.choose_test_time_shift(network, photos, labels, **options)
        digits = labels.argmax(axis=1) if labels.ndim == 2 else labels
        assert [scores.errors_single, scores.errors_shifted] == expected(digits)[0]
        np.testing.assert_allclose([scores.loss_single, scores.loss_shifted], expected(digits)[1], rtol=1e-5)
        return shift

    # Labelled as the shifted views answer, or as the photos alone answer: the loss and the errors agree.
    assert choice(shifted.argmax(axis=1)) == config.TEST_TIME_SHIFT
    assert choice(np.eye(10)[shifted.argmax(axis=1)]) == config.TEST_TIME_SHIFT  # one-hot rows
    assert choice(alone.argmax(axis=1)) == 0
    # Labels on which the shifts get one more photo wrong (3 against 2) but lower the loss: served.
    disagree = [9, 0, 2, 7, 7, 2]
    (wrong_alone, wrong_shifted), (loss_alone, loss_shifted) = expected(disagree)
    assert wrong_shifted > wrong_alone and loss_shifted < loss_alone
    assert choice(disagree) == config.TEST_TIME_SHIFT
    # And the other way round: one photo fewer wrong shifted (1 against 2), a higher loss: not served.
    disagree = [7, 9, 2, 7, 5, 2]
    (wrong_alone, wrong_shifted), (loss_alone, loss_shifted) = expected(disagree)
    assert wrong_shifted < wrong_alone and loss_shifted > loss_alone
    assert choice(disagree) == 0
    # train's --test-time-augmentation on and off decide instead of the rule; the scores are the same.
    assert choice(alone.argmax(axis=1), mode="on") == config.TEST_TIME_SHIFT
    assert choice(shifted.argmax(axis=1), mode="off") == 0


def test_a_model_logged_with_the_shift_off_answers_every_photo_alone(mlflow_store):
    model = shift_sensitive_classifier()
    with mlflow.start_run():
        info = serving.log_model(model, None, test_time_shift=0)
    served = mlflow.pyfunc.load_model(info.model_uri)
    assert served.model_config[serving.TEST_TIME_SHIFT_KEY] == 0
    assert not served.unwrap_python_model().shifted_photos(np.array([0.1, 0.5, 0.9])).any()
    photos = [pixels((64, 64, 3), seed) for seed in range(6)]
    np.testing.assert_allclose(
        served.predict(pd.DataFrame({"image": photos}))[PROBABILITIES],
        expected_probabilities(model, serving.build_batch(photos), shift=0),
        atol=1e-5,
    )


def test_a_model_logged_before_the_gate_shifts_every_photo(tmp_path):
    model = shift_sensitive_classifier()
    path = tmp_path / serving.KERAS_FILE
    model.save(path)
    old = serving.SignDigitsModel()
    old.load_context(
        mlflow.pyfunc.PythonModelContext(
            artifacts={serving.KERAS_ARTIFACT: str(path)},
            model_config={serving.TEST_TIME_SHIFT_KEY: config.TEST_TIME_SHIFT},
        )
    )
    batch = np.stack([pixels((64, 64, 3), seed) for seed in range(4)])
    np.testing.assert_allclose(
        old.predict(None, batch)[PROBABILITIES], expected_probabilities(model, batch, gate=None), atol=1e-5
    )
    assert old.shifted_photos(np.array([0.1, 0.5, 0.9])).all()


def test_the_shift_is_stored_with_the_model_and_the_parameter_in_its_signature(served):
    # log_model's default: every stage in float32.
    assert served.model_config == {
        serving.TEST_TIME_SHIFT_KEY: config.TEST_TIME_SHIFT,
        serving.TEST_TIME_GATE_KEY: config.TEST_TIME_GATE,
        serving.BFLOAT16_STAGES_KEY: [],
    }
    (param,) = served.metadata.signature.params.params
    assert (param.name, param.dtype.name, param.default) == (serving.TEST_TIME_AUGMENTATION, "boolean", True)


def test_a_model_logged_without_a_shift_answers_from_the_photo_alone(tmp_path, keras_model):
    """Models registered before test-time augmentation have no model_config."""
    path = tmp_path / serving.KERAS_FILE
    keras_model.save(path)
    old = serving.SignDigitsModel()
    old.load_context(
        mlflow.pyfunc.PythonModelContext(artifacts={serving.KERAS_ARTIFACT: str(path)}, model_config={})
    )
    assert old.test_time_shift == 0 and old.bfloat16_stages == ()
    batch = pixels((3, 64, 64, 3))
    np.testing.assert_allclose(
        old.predict(None, batch)[PROBABILITIES], expected_probabilities(keras_model, batch, 0), atol=1e-5
    )


@pytest.mark.parametrize(
    "params, message",
    [
        ({serving.TEST_TIME_AUGMENTATION: "no"}, "must be true or false; got 'no'"),
        ({serving.TEST_TIME_AUGMENTATION: 0}, "must be true or false; got 0"),
        ({"views": 3}, r"unknown parameters \['views'\]; the one parameter is test_time_augmentation"),
    ],
)
def test_a_bad_parameter_is_refused_naming_it(python_model, params, message):
    with pytest.raises(MlflowException, match=message) as raised:
        python_model.predict(None, [photo_bytes(1, 0)], params)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


def test_mlflow_refuses_a_parameter_of_the_wrong_type(served):
    with pytest.raises(MlflowException, match=serving.TEST_TIME_AUGMENTATION):
        served.predict([photo_bytes(1, 0)], params={serving.TEST_TIME_AUGMENTATION: "maybe"})


def test_build_batch_gives_the_pixels_ingest_gives(served):
    jpeg, rgba = photo_bytes(4, 3, size=90), pixels((33, 47, 4))
    grey, floats = pixels((20, 64)), pixels((64, 30, 3)).astype(np.float32)
    batch = serving.build_batch(
        pd.DataFrame({"image": [jpeg, b64(jpeg), rgba, grey.tolist(), floats, rgba[..., :3]]})
    )
    want = [images.preprocess(jpeg)] * 2 + [
        images.preprocess_array(photo) for photo in (rgba, grey, floats, rgba[..., :3])
    ]
    assert batch.dtype == np.uint8
    assert batch.shape == (6, config.IMAGE_SIZE, config.IMAGE_SIZE, 3)
    np.testing.assert_array_equal(batch, np.stack(want))


# predict: errors

GOOD = b64(photo_bytes(1, 0))


BAD_ITEMS = [
    pytest.param("!!not*base64!!", "not valid base64", id="garbage-base64"),
    pytest.param("QUJD" * 3 + "Q", "not valid base64", id="base64-bad-length"),
    pytest.param(b64(b"just some text, not a photo"), "not an image", id="base64-of-text"),
    pytest.param("data:image/png,rawbytes", "data URL must be base64", id="data-url-not-base64"),
    pytest.param("", "empty", id="empty-string"),
    pytest.param(png(pixels((64, 64, 3)))[:200], "broken or truncated", id="truncated-png-bytes"),
    pytest.param(pixels((64,)).tolist(), "shape", id="rank-1"),
    pytest.param(pixels((2, 64, 64, 3)), "shape", id="rank-4"),
    pytest.param(pixels((64, 64, 2)), "got shape (64, 64, 2)", id="two-channels"),
    pytest.param(np.full((64, 64, 3), "a"), "expected numbers", id="strings"),
    pytest.param(np.ones((64, 64), dtype=bool), "expected numbers", id="booleans"),
    pytest.param(np.full((64, 64), np.nan), "NaN or infinity", id="nan"),
    pytest.param(np.full((64, 64), np.inf), "NaN or infinity", id="inf"),
    pytest.param(np.full((64, 64), 256.0), "0..255", id="above-255"),
    pytest.param(-pixels((64, 64)).astype(np.int16) - 1, "0..255", id="negative"),
    pytest.param([[1, 2, 3], [4, 5]], "differ in length", id="ragged-lists"),
    pytest.param([[None] * 9] * 9, "not all numbers", id="none-pixels"),
    pytest.param(pixels((30, 3)), "too small", id="one-row-of-pixels"),
    pytest.param(None, "missing", id="none"),
    pytest.param(3.5, "cannot read an image from float", id="number"),
    pytest.param("   \n ", "empty", id="whitespace-string"),
    pytest.param("写真です", "not valid base64", id="non-ascii-string"),
    pytest.param(b64(b"%PDF-1.4 not a photo"), "not an image", id="base64-of-a-pdf-header"),
    pytest.param(b64(png(pixels((1, 1, 3)))), "1x1 pixels is too small", id="base64-of-a-1x1-png"),
    pytest.param(b64(bomb_png()), "decompression bomb", id="base64-of-a-20000x20000-png"),
    pytest.param(bomb_png(), "decompression bomb", id="bytes-of-a-20000x20000-png"),
    pytest.param(pixels((1, 16, 16, 3, 1)), "got shape (1, 16, 16, 3, 1)", id="rank-5"),
    pytest.param(pixels((64, 64, 5)), "got shape (64, 64, 5)", id="five-channels"),
    pytest.param(np.full((16, 16, 3), np.nan, np.float16), "NaN or infinity", id="float16-nan"),
    pytest.param(np.full((16, 16, 3), -np.inf), "NaN or infinity", id="minus-inf"),
    pytest.param(np.full((16, 16, 3), 2**63, np.uint64), "0..255", id="huge-uint64"),
    pytest.param(np.full((16, 16, 3), 1 + 1j), "expected numbers", id="complex"),
    pytest.param(np.full((16, 16, 3), None, dtype=object), "not all numbers", id="object-nones"),
    pytest.param({"pixels": 1}, "cannot read an image from dict", id="dict"),
    pytest.param(True, "cannot read an image from bool", id="bool"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_ITEMS)
def test_a_bad_item_is_refused_naming_it_and_what_to_send(served, bad, message):
    column = pd.Series([GOOD, GOOD, bad, GOOD], dtype=object)
    with pytest.raises(MlflowException) as raised:
        served.predict(pd.DataFrame({"image": column}))
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert raised.value.message.startswith("image 2: ")
    assert message in raised.value.message
    assert "send " in raised.value.message


def test_of_two_bad_photos_the_first_in_the_batch_is_named(served):
    # The first fails only after decoding most of a large JPEG, the second at once.
    large = io.BytesIO()
    Image.fromarray(pixels((64, 64, 3))).resize((2000, 1500)).save(large, "JPEG")
    truncated = large.getvalue()[: -len(large.getvalue()) // 10]
    photos = [GOOD, b64(truncated), GOOD, "!!not*base64!!"]
    with pytest.raises(MlflowException) as raised:
        served.predict(pd.DataFrame({"image": photos}))
    assert raised.value.message.startswith("image 1: ")


def test_the_model_answers_the_same_after_every_bad_input(served):
    good = pd.DataFrame({"image": [GOOD]})
    before = served.predict(good)
    for case in BAD_ITEMS:
        with pytest.raises(MlflowException):
            served.predict(pd.DataFrame({"image": pd.Series([case.values[0]], dtype=object)}))
    pd.testing.assert_frame_equal(served.predict(good), before)


def test_a_base64_string_over_the_size_limit_is_refused_before_decoding(served, monkeypatch):
    monkeypatch.setattr(config, "MAX_IMAGE_FILE_BYTES", 3_000)
    with pytest.raises(MlflowException) as raised:
        served.predict(pd.DataFrame({"image": [GOOD, "QUJD" * 1_001]}))
    assert "image 1: 4,004 base64 characters hold more than the 3,000-byte limit" in raised.value.message


def test_one_and_four_channels_are_taken_as_grey_and_rgba(served):
    grey = pixels((40, 30), 3)
    rgb = pixels((40, 30, 3), 4)
    rgba = np.dstack([rgb, np.full((40, 30), 255, np.uint8)])  # opaque: the same photo as rgb
    photos = [grey, grey[..., None], np.dstack([grey] * 3), rgba, rgb]
    answer = served.predict(pd.DataFrame({"image": photos}))
    pd.testing.assert_frame_equal(
        answer.iloc[[1, 2]].reset_index(drop=True), answer.iloc[[0, 0]].reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(
        answer.iloc[[3]].reset_index(drop=True), answer.iloc[[4]].reset_index(drop=True)
    )


def test_an_empty_batch_is_refused(served, python_model):
    with pytest.raises(MlflowException, match="the batch is empty") as raised:
        served.predict(pd.DataFrame({"image": []}))
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match="the batch is empty"):
        python_model.predict(None, [])


def test_a_batch_over_the_limit_is_refused_before_decoding(served):
    tiny = b64(png(pixels((8, 8, 3))))
    # item 0 is garbage: had anything been decoded, that would be the error
    photos = ["!garbage!"] + [tiny] * config.MAX_PREDICT_BATCH
    start = time.perf_counter()
    with pytest.raises(MlflowException, match=f"at most {config.MAX_PREDICT_BATCH:,}") as raised:
        served.predict(pd.DataFrame({"image": photos}))
    assert time.perf_counter() - start < 1.0
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"
    assert f"{config.MAX_PREDICT_BATCH + 1:,} images" in raised.value.message
    assert len(serving.build_batch([tiny] * config.MAX_PREDICT_BATCH)) == config.MAX_PREDICT_BATCH


@pytest.mark.parametrize(
    "bad",
    [
        pd.DataFrame({"a": [GOOD], "b": [GOOD]}),
        {"image": [GOOD], "other": [GOOD]},
        pixels((64, 64, 3)),
        pixels((64, 64)),
        pixels((1, 16, 16, 3, 1)),
        GOOD,
        7,
    ],
    ids=["two-columns", "two-keys", "3d-array", "2d-array", "5d-array", "bare-string", "number"],
)
def test_the_python_model_refuses_inputs_it_cannot_read(python_model, bad):
    with pytest.raises(MlflowException, match="send a|expected a") as raised:
        python_model.predict(None, bad)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


# bf16 training, float32 serving


@pytest.mark.slow
def test_a_bf16_resnet50_is_stored_in_float32_and_served_folded_agreeing_with_it(mlflow_store, tmp_path):
    from pipeline.resnet import build_resnet50

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_resnet50((config.IMAGE_SIZE, config.IMAGE_SIZE, 3), config.NUM_CLASSES)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # Spread the logits, so the comparison is not between near-uniform outputs.
    kernel, bias = model.get_layer("fc").get_weights()
    rng = np.random.default_rng(0)
    spread = rng.normal(0, 20 / np.sqrt(len(kernel)), kernel.shape).astype(np.float32)
    model.get_layer("fc").set_weights([spread, bias])
    with mlflow.start_run():
        info = serving.log_model(model, "resnet")
    folder = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    size = (folder / "artifacts" / serving.KERAS_FILE).stat().st_size
    assert size < 120e6, f"{size / 1e6:.1f} MB: optimizer state or bf16 copies slipped in"

    served = mlflow.pyfunc.load_model(f"models:/resnet/{info.registered_model_version}")
    stored = keras.saving.load_model(folder / "artifacts" / serving.KERAS_FILE, compile=False)
    assert {layer.dtype_policy.name for layer in stored.layers} == {"float32"}
    network = served.unwrap_python_model().network
    assert network.precisions == ["f32"]  # logged without bfloat16 stages
    assert network.runtime_precisions() == [{"f32"}]
    folded = network.models[0].get_runtime_model().get_ops()
    assert len([op for op in folded if op.get_rt_info()["layerType"].astype(str) == "Convolution"]) == 53
    photos = [pixels((64, 64, 3), seed) for seed in range(6)]
    served_probabilities = served.predict(pd.DataFrame({"image": photos}))[PROBABILITIES].to_numpy()
    bf16_probabilities = expected_probabilities(model, serving.build_batch(photos))
    np.testing.assert_allclose(served_probabilities, bf16_probabilities, atol=1e-2)
    np.testing.assert_array_equal(served_probabilities.argmax(axis=1), bf16_probabilities.argmax(axis=1))

    # A fresh process that imports nothing of the project loads it too (the saved model
    # names the project's fused batch-norm layer, which loading has to find).
    load = (
        "import sys, mlflow, pandas, numpy; mlflow.set_tracking_uri(sys.argv[1]); "
        "model = mlflow.pyfunc.load_model(sys.argv[2]); "
        "photo = numpy.zeros((64, 64, 3), numpy.uint8); "
        "print(model.predict(pandas.DataFrame({'image': [photo]}))['digit'].iloc[0])"
    )
    uri = f"models:/resnet/{info.registered_model_version}"
    answer = subprocess.run(
        [sys.executable, "-c", load, mlflow.get_tracking_uri(), uri],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert answer.stdout.split()[-1] in tuple("0123456789")  # one digit, not a substring


def named(layer) -> bool:
    """A layer with weights or a block's output: what a cut between stages starts or ends at."""
    return bool(layer.weights) or layer.name.endswith("_out")


@pytest.mark.slow
def test_the_served_network_runs_the_fastest_bfloat16_stages_that_stay_close_to_float32(
    mlflow_store, monkeypatch
):
    from pipeline import resnet

    keras.utils.set_random_seed(1)
    model = resnet.build_resnet50((32, 32, 3), config.NUM_CLASSES)
    kernel, bias = model.get_layer("fc").get_weights()
    spread = np.random.default_rng(1).normal(0, 20 / np.sqrt(len(kernel)), kernel.shape)
    model.get_layer("fc").set_weights([spread.astype(np.float32), bias])  # answers far from uniform
    photos = np.stack([pixels((32, 32, 3), seed) for seed in range(8)])
    float32 = serving.inference_model(model)
    with pytest.raises(ValueError, match="follow each other"):
        serving.precision_parts(float32, (3, 5))
    if not fitting.bf16_is_native():  # no bfloat16 to measure here: served in float32
        assert serving.choose_bfloat16_stages(model, photos)[:2] == ((), 0.0)
        return
    expected = serving.forward(float32, photos)
    answers = {
        stages: serving.in_chunks(serving.ServedNetwork(float32, stages), photos)
        for stages in config.SERVING_BFLOAT16_CANDIDATES
    }
    gaps = {stages: np.abs(answer - expected).max() for stages, answer in answers.items()}
    assert min(gaps.values()) > 0

    # The first candidate within the allowed gap wins, whatever its place: where only the closest
    # passes, where half of them do and where all do (each check compiles the candidates it tries).
    ordered = sorted(gaps.values())
    for allowed in (ordered[0], ordered[len(ordered) // 2], ordered[-1]):
        monkeypatch.setattr(config, "SERVING_MAX_PROBABILITY_GAP", float(allowed))
        first = next(stages for stages, gap in gaps.items() if gap <= allowed)
        choice = serving.choose_bfloat16_stages(model, photos)
        assert choice[:2] == (first, pytest.approx(gaps[first]))
        # The network it hands on computes the chosen stages: the answers measured for them.
        np.testing.assert_allclose(serving.in_chunks(choice.network, photos), answers[first], atol=1e-6)
    # None within it: float32 throughout (one candidate tried is enough to see that).
    monkeypatch.setattr(config, "SERVING_MAX_PROBABILITY_GAP", min(gaps.values()) / 2)
    monkeypatch.setattr(config, "SERVING_BFLOAT16_CANDIDATES", config.SERVING_BFLOAT16_CANDIDATES[:1])
    choice = serving.choose_bfloat16_stages(model, photos)
    assert choice[:2] == ((), 0.0)
    assert choice.network.precisions == ["f32"]
    assert serving.choose_bfloat16_stages(tiny_classifier(), photos)[:2] == ((), 0.0)  # not a ResNet-50

    # The logged model names its stages, and the served network computes them in bfloat16.
    stages = (1, 2, 3, 4, 5)  # the whole network
    with mlflow.start_run():
        info = serving.log_model(model, registered_model_name=None, bfloat16_stages=stages)
    served = mlflow.pyfunc.load_model(info.model_uri)
    assert served.model_config[serving.BFLOAT16_STAGES_KEY] == list(stages)
    assert served.unwrap_python_model().bfloat16_stages == stages
    parts = serving.precision_parts(float32, (4, 5))
    names = [[layer.name for layer in part.layers if named(layer)] for part, _ in parts]
    assert [precision for _, precision in parts] == ["f32", "bf16", "f32"]
    assert (names[0][0], names[0][-1], names[1][0], names[1][-1], names[2]) == (
        "conv1",
        "res3d_out",
        "res4a_branch2a",
        "res5c_out",
        ["fc"],
    )
    # With the stem, the bfloat16 part takes the raw pixels and rescales them itself.
    parts = serving.precision_parts(float32, (1, 2, 3, 4, 5))
    assert [precision for _, precision in parts] == ["bf16", "f32"]
    assert [layer.name for layer in parts[0][0].layers[:3]] == ["pixels", "rescale", "conv1_pad"]
    assert [layer.name for layer in parts[0][0].layers if named(layer)][-1] == "res5c_out"
    network = served.unwrap_python_model().network
    assert network.precisions == ["bf16", "f32"]
    assert network.runtime_precisions() == [{"bf16"}, set()]  # the last: pooling, fc
    answers = served.predict(pd.DataFrame({"image": list(photos)}), {"test_time_augmentation": False})
    np.testing.assert_allclose(answers[PROBABILITIES].to_numpy(), expected, atol=gaps[stages] + 1e-6)
    np.testing.assert_array_equal(answers["digit"].to_numpy(), expected.argmax(axis=1))
