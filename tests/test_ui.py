"""The MLflow UI, in headless Chromium: a search run and its trial runs with their metrics.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them) and selenium
(a dev extra); skipped, with a note, where they are missing.
"""

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from conftest import ROOT, free_port, make_tree

from pipeline import config, ingest, onehot, tune

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT_DIR = Path(os.environ.get("SIGN_DIGITS_TEST_ARTIFACTS", ROOT / ".test-artifacts"))
CHROMIUM_FLAGS = (
    "--headless=new --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --window-size=2600,1000"
).split()


@pytest.fixture
def tracking_server(mlflow_store, tmp_path):
    """`mlflow server` on a loopback port over the test's SQLite store."""
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            mlflow_store,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", server)
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def wait_for(url: str, server: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server did not answer {url} within {seconds} s")


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(20)
    yield driver
    driver.quit()


def test_experiment_page_lists_the_search_and_its_trials(tmp_path, monkeypatch, tracking_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # A real (tiny) search: two trials of one epoch on 32x32 generated photos.
    monkeypatch.setenv(config.TUNER_DIR_ENV, str(tmp_path / "tuner"))
    ingest.main(["--source", str(make_tree(tmp_path / "photos", per_class=3)), "--image-size", "32"])
    onehot.main([])
    tune.main(
        ["--max-trials", "2", "--epochs-per-trial", "1", "--oracle", "random", "--precision", "float32"]
    )
    experiment = mlflow.get_experiment_by_name("tests").experiment_id
    search = mlflow.search_runs([experiment], "tags.`pipeline.stage` = 'tune'", output_format="list")[0]
    trials = mlflow.search_runs(
        [experiment], f"tags.`mlflow.parentRunId` = '{search.info.run_id}'", output_format="list"
    )
    assert len(trials) == 2

    browser.get(f"{tracking_server}/#/experiments/{experiment}/runs")
    for close in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        close.click()  # the assistant panel hides columns
    expander = f"//a[normalize-space()='{search.info.run_name}']/ancestor::*[@role='gridcell'][1]//button"
    browser.find_element(By.XPATH, expander).click()
    browser.find_element(By.XPATH, "//button[normalize-space()='Columns']").click()
    for column in ("val_accuracy", "learning_rate", "batch_size"):
        browser.find_element(By.XPATH, f"//*[@role='dialog']//*[normalize-space(text())='{column}']").click()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    time.sleep(1)

    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT_DIR / "mlflow-ui-search.png"))
    page = browser.find_element(By.CSS_SELECTOR, "[role='grid'], [role='treegrid']").text
    headers = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "[role='columnheader']")]
    assert search.info.run_name in page
    for trial in trials:
        assert trial.info.run_name in page
        assert f"{trial.data.metrics['val_accuracy']:.3g}"[:4] in page
    assert {"val_accuracy", "learning_rate", "batch_size"} <= set(headers)
