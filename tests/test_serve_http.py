"""`mlflow models serve` of the registered champion: the JSON shapes it takes and the errors it gives."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from conftest import (
    b64,
    bomb_png,
    expected_probabilities,
    free_port,
    photo_bytes,
    shift_sensitive_classifier,
    sqlite_store,
)
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import config, images, serving

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "http-digits"
COLUMNS = ["digit", "confidence", *(f"p{k}" for k in range(config.NUM_CLASSES))]
STARTUP_S = 120
REQUEST_S = 60


@pytest.fixture(scope="module")
def keras_model() -> keras.Model:
    return shift_sensitive_classifier()  # so that answers with and without test-time shifts differ


@pytest.fixture(scope="module")
def store(tmp_path_factory, keras_model):
    """A SQLite store under tmp_path with the tiny model registered as the champion."""
    root = tmp_path_factory.mktemp("serve")
    previous_tmp = tempfile.tempdir
    with sqlite_store(root) as uri:
        tempfile.tempdir = str(root)
        try:
            experiment = mlflow.create_experiment("serve", artifact_location=(root / "artifacts").as_uri())
            with mlflow.start_run(experiment_id=experiment):
                info = serving.log_model(keras_model, NAME)
            MlflowClient().set_registered_model_alias(
                NAME, config.CHAMPION_ALIAS, info.registered_model_version
            )
        finally:
            tempfile.tempdir = previous_tmp
    return root, uri


@pytest.fixture(scope="module")
def server(store):
    """The base URL of `mlflow models serve` on 127.0.0.1; the server is stopped afterwards."""
    root, uri = store
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "TMPDIR": str(root),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        # the serve command starts `uvicorn` from PATH: use this interpreter's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "--env-manager", "local"]
    command += ["-m", f"models:/{NAME}@{config.CHAMPION_ALIAS}", "-h", "127.0.0.1", "-p", str(port)]
    stderr = root / "server.err"
    with open(root / "server.out", "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, process, stderr)
        yield url
    finally:
        stop(process)


def wait_until_up(url: str, process: subprocess.Popen, stderr: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{stderr.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"no 200 from {url}/ping within {STARTUP_S} s:\n{stderr.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> None:
    """End the server's own process group (the CLI runs uvicorn as a child)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def post(url: str, body, content_type: str = "application/json") -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_S) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def predictions(url: str, body) -> list[dict]:
    status, text = post(url, body)
    assert status == 200, text[:2000]
    return json.loads(text)["predictions"]


def probabilities(rows: list[dict]) -> np.ndarray:
    return np.array([[row[f"p{k}"] for k in range(config.NUM_CLASSES)] for row in rows])


PHOTOS = [photo_bytes(2, 0, size=50), photo_bytes(7, 1, size=80)]


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


PIXELS = [np.random.default_rng(0).integers(0, 256, (48, 40, 3)), np.full((40, 52), 90)]


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_split": {"columns": ["image"], "data": [[b64(p)] for p in PHOTOS]}},
        {"dataframe_records": [{"image": b64(p)} for p in PHOTOS]},
        {"inputs": [b64(p) for p in PHOTOS]},
        {"instances": [b64(p) for p in PHOTOS]},
        {
            "inputs": [
                "data:image/jpeg;base64," + b64(PHOTOS[0]),
                base64.urlsafe_b64encode(PHOTOS[1]).decode(),
            ]
        },
    ],
    ids=["dataframe_split", "dataframe_records", "inputs", "instances", "data-url-and-url-safe"],
)
def test_base64_photos_in_every_json_shape(server, keras_model, body):
    rows = predictions(server, body)
    assert [list(row) for row in rows] == [COLUMNS] * len(PHOTOS)
    want = expected_probabilities(keras_model, np.stack([images.preprocess(photo) for photo in PHOTOS]))
    np.testing.assert_allclose(probabilities(rows), want, atol=1e-5)
    assert [row["digit"] for row in rows] == list(want.argmax(axis=1))
    assert [row["confidence"] for row in rows] == pytest.approx(list(want.max(axis=1)), abs=1e-5)


@pytest.mark.parametrize("shape", ["dataframe_records", "dataframe_split"])
def test_pixels_as_nested_lists_in_the_dataframe_shapes(server, keras_model, shape):
    cells = [pixels.tolist() for pixels in PIXELS]
    if shape == "dataframe_records":
        body = {"dataframe_records": [{"image": cell} for cell in cells]}
    else:
        body = {"dataframe_split": {"columns": ["image"], "data": [[cell] for cell in cells]}}
    rows = predictions(server, body)
    batch = np.stack([images.preprocess_array(pixels) for pixels in PIXELS])
    np.testing.assert_allclose(probabilities(rows), expected_probabilities(keras_model, batch), atol=1e-5)


@pytest.mark.parametrize("on", [False, True])
def test_a_request_turns_test_time_augmentation_on_or_off(server, keras_model, on):
    body = {"inputs": [b64(photo) for photo in PHOTOS], "params": {serving.TEST_TIME_AUGMENTATION: on}}
    batch = np.stack([images.preprocess(photo) for photo in PHOTOS])
    shifts = (config.TEST_TIME_SHIFT, 0) if on else (0, config.TEST_TIME_SHIFT)
    want, other = (expected_probabilities(keras_model, batch, shift) for shift in shifts)
    assert np.abs(want - other).max() > 1e-2  # the two answers differ for this model
    np.testing.assert_allclose(probabilities(predictions(server, body)), want, atol=1e-5)


def test_a_parameter_of_the_wrong_type_gets_a_400(server):
    body = {"inputs": [GOOD], "params": {serving.TEST_TIME_AUGMENTATION: "maybe"}}
    status, text = post(server, body)
    assert status == 400, text[:2000]
    assert serving.TEST_TIME_AUGMENTATION in json.loads(text)["message"]
    assert "Traceback" not in text


GOOD = b64(PHOTOS[0])


NAN_PIXELS = json.dumps({"dataframe_records": [{"image": [[float("nan")] * 9] * 9}]}).encode()  # NaN literals
INF_PIXELS = json.dumps({"dataframe_records": [{"image": [[0, float("inf")] * 5] * 9}]}).encode()
MALFORMED = [
    pytest.param({"inputs": [GOOD, "%%% not base64 %%%"]}, "image 1: not valid base64", id="garbage-base64"),
    pytest.param({"inputs": [b64(b"plain text, not a photo")]}, "image 0: not an image", id="base64-of-text"),
    pytest.param(
        {"dataframe_records": [{"image": np.zeros((8, 8, 2), int).tolist()}]},
        "got shape (8, 8, 2)",
        id="two-channels",
    ),
    pytest.param(
        {"dataframe_split": {"columns": ["image"], "data": [[np.zeros((9, 9, 5), int).tolist()]]}},
        "got shape (9, 9, 5)",
        id="five-channels",
    ),
    pytest.param(
        {"dataframe_records": [{"image": np.zeros((1, 9, 9, 3, 1), int).tolist()}]},
        "got shape (1, 9, 9, 3, 1)",
        id="rank-5-pixels",
    ),
    pytest.param(
        {"inputs": np.zeros((1, 9, 9, 3, 1), int).tolist()}, "send each photo's pixels", id="rank-5-inputs"
    ),
    pytest.param({"dataframe_records": [{"image": [0] * 64}]}, "shape (64,)", id="rank-1-pixels"),
    pytest.param(
        {"dataframe_split": {"columns": ["image"], "data": [[[[1, 2], [3]]]]}},
        "differ in length",
        id="ragged",
    ),
    pytest.param({"dataframe_records": [{"image": [[300] * 9] * 9}]}, "0..255", id="pixels-out-of-range"),
    pytest.param(
        {"dataframe_records": [{"image": [[True] * 9] * 9}]},
        "expected numbers, got dtype bool",
        id="booleans",
    ),
    pytest.param(
        {"dataframe_records": [{"image": [["a"] * 9] * 9}]}, "expected numbers", id="strings-as-pixels"
    ),
    pytest.param(NAN_PIXELS, "NaN or infinity", id="nan-pixels"),
    pytest.param(INF_PIXELS, "NaN or infinity", id="inf-pixels"),
    pytest.param({"inputs": [PIXELS[0].tolist()]}, "too small", id="pixels-under-inputs"),
    pytest.param({"inputs": [b64(tiny_png())]}, "1x1 pixels is too small", id="base64-of-a-1x1-png"),
    pytest.param({"inputs": [b64(bomb_png())]}, "decompression bomb", id="base64-of-a-20000x20000-png"),
    pytest.param(
        {"dataframe_split": {"columns": ["image"], "data": []}}, "the batch is empty", id="empty-dataframe"
    ),
    pytest.param({"inputs": []}, "0 inputs", id="empty-inputs"),
    pytest.param(
        {"inputs": [GOOD] * (config.MAX_PREDICT_BATCH + 1)},
        f"at most {config.MAX_PREDICT_BATCH:,}",
        id="too-many",
    ),
    pytest.param(b"{not json", "valid JSON", id="not-json"),
    pytest.param({"images": [GOOD]}, "inputs", id="unknown-key"),
]


@pytest.mark.parametrize(("body", "message"), MALFORMED)
def test_malformed_requests_get_a_400_naming_the_problem_without_a_traceback(server, body, message):
    status, text = post(server, body)
    assert status == 400, text[:2000]
    answer = json.loads(text)
    assert message in answer["message"]
    assert "Traceback" not in text
    assert "stack_trace" not in answer


def test_the_server_keeps_answering_good_requests_after_every_bad_one(server):
    good = {"inputs": [GOOD]}
    before = predictions(server, good)
    bad_bodies = [case.values[0] for case in MALFORMED] + [b"\xff\xfe", b"", b"null", b"[]", b'"x"']
    for body in bad_bodies:
        status, text = post(server, body)
        assert 400 <= status < 500, (body if isinstance(body, bytes) else str(body)[:200], status, text[:500])
    assert post(server, b"image,\n%%%\n", content_type="text/csv")[0] == 400
    assert 400 <= post(server, b"\x00\x01", content_type="image/png")[0] < 500
    assert predictions(server, good) == before
