"""The throughput benchmark's inference variants run on a tiny setting: a registered model on a
folder of photos, the table it prints and the JSON it writes. No timing is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from conftest import expected_probabilities, make_tree, shift_sensitive_classifier
from PIL import Image

from pipeline import config, ingest, serving, tracking

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def benchmark(*options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARK), "--tiny", *options], capture_output=True, text=True, timeout=600
    )


def test_a_registered_model_is_timed_on_a_folder_of_photos(mlflow_store, tmp_path):
    model = shift_sensitive_classifier()
    with mlflow.start_run():
        serving.log_model(model, "bench-model")
    folder = tmp_path / "photos" / "3"
    folder.mkdir(parents=True)
    photos = [np.random.default_rng(seed).integers(0, 256, (64, 64, 3), np.uint8) for seed in range(70)]
    for index, pixels in enumerate(photos):
        Image.fromarray(pixels).save(folder / f"IMG_{index:04}.png")
    out = tmp_path / "throughput.json"
    variants = ["project-predict", "project-predict-single"]
    options = ["--model", "models:/bench-model/1", "--photos", str(tmp_path / "photos"), "--out", str(out)]
    done = benchmark(*options, "--variants", *variants)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())
    rows = {row["variant"]: row for row in table["rows"]}
    assert list(rows) == variants and all(row["images_per_s"] > 0 for row in rows.values())
    # Figures differ between hosts: the table names the one they come from.
    host = table["machine"]
    assert host["processor"] and host["cores"] == os.cpu_count()
    cpu_flags = Path("/proc/cpuinfo").read_text()
    assert ("avx512_bf16" in host["bfloat16"]) == (" avx512_bf16" in cpu_flags)
    assert ("amx_bf16" in host["bfloat16"]) == (" amx_bf16" in cpu_flags)
    assert host["threads"] == len(os.sched_getaffinity(0))
    assert f"machine: {host['processor']}, {host['cores']} cores" in done.stdout
    assert f"TensorFlow threads: {host['threads']}" in done.stdout
    # The first 64 photos by name (70 // 64 = every one); the unsure ones took the shifted copies.
    single = expected_probabilities(model, np.stack(photos[:64]), shift=0)
    unsure = np.mean(single.max(axis=1) < config.TEST_TIME_GATE)
    assert 0 < unsure < 1
    assert rows["project-predict"]["share_shifted"] == unsure
    assert rows["project-predict-single"]["share_shifted"] == 0
    assert "project-predict-single" in done.stdout and f"{unsure:.0%}" in done.stdout


def test_a_registered_model_is_timed_on_the_test_split_of_the_run_that_trained_it(mlflow_store, tmp_path):
    source = make_tree(tmp_path / "dataset", per_class=45)
    ingest.main(["--source", str(source)])
    ingested = tracking.find_run("ingest", "").info.run_id
    model = shift_sensitive_classifier()
    with mlflow.start_run(tags={config.INGEST_RUN_TAG: ingested}):  # as train tags its run
        serving.log_model(model, "bench-model")
    out = tmp_path / "throughput.json"
    options = ["--model", "models:/bench-model/1", "--split", "test", "--out", str(out)]
    done = benchmark(*options, "--variants", "project-predict")
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]

    manifest = pd.read_csv(tracking.download(mlflow.get_run(ingested), "dataset/manifest.csv"))
    names = sorted(manifest.loc[manifest["split"] == "test", "file"])
    assert len(names) > 64  # 64 spread over them, as from a folder
    picked = [(source / name).read_bytes() for name in names[:: len(names) // 64][:64]]
    single = expected_probabilities(model, serving.build_batch(picked), shift=0)
    unsure = np.mean(single.max(axis=1) < config.TEST_TIME_GATE)
    assert 0 < unsure < 1
    assert row["share_shifted"] == unsure


def test_bad_options_are_refused_naming_them(mlflow_store, tmp_path):
    done = benchmark("--photos", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "--photos" in done.stderr and "no such folder or .zip" in done.stderr
    done = benchmark("--model", "models:/none/1", "--variants", "project-predict-single-float32")
    assert done.returncode != 0 and "not with --model" in done.stderr
    done = benchmark("--model", "models:/none/1", "--bfloat16-stages", "3,4,5")
    assert done.returncode == 2 and "--bfloat16-stages: not with --model" in done.stderr
    done = benchmark("--split", "test")
    assert done.returncode == 2 and "--split needs --model" in done.stderr
    done = benchmark("--model", "models:/none/1", "--split", "test")
    assert done.returncode != 0 and "--split test" in done.stderr and "does not resolve" in done.stderr
