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
    done = benchmark("--model", "models:/none/1", "--bfloat16-stages", "1,2,3,4,5")  # read, then refused
    assert done.returncode == 2 and "--bfloat16-stages: not with --model" in done.stderr
    done = benchmark("--bfloat16-stages", "0,1")
    assert done.returncode == 2 and "stages are numbers 1-5" in done.stderr
    done = benchmark("--split", "test")
    assert done.returncode == 2 and "--split needs --model" in done.stderr
    done = benchmark("--model", "models:/none/1", "--split", "test")
    assert done.returncode != 0 and "--split test" in done.stderr and "does not resolve" in done.stderr


def test_the_gpu_benchmark_runs_the_projects_own_recipe():
    """benchmarks/gpu_jax.py compiles fitting's and data's functions from their source, to run
    them without TensorFlow: here they run, and build and compile what the modules' own do."""
    import importlib.util

    from pipeline import data, fitting

    spec = importlib.util.spec_from_file_location("gpu_jax", BENCHMARK.parent / "gpu_jax.py")
    gpu_jax = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_jax)
    recipe = gpu_jax.load_recipe()
    ours, theirs = recipe["new_model"](32), fitting.new_model(32)
    assert [layer.name for layer in ours.layers] == [layer.name for layer in theirs.layers]
    assert ours.count_params() == theirs.count_params()
    recipe["compile_model"](ours, 1e-3, steps_per_epoch=10, epochs=4)
    fitting.compile_model(theirs, 1e-3, steps_per_epoch=10, epochs=4)
    configs = [{**model.optimizer.get_config(), "name": None} for model in (ours, theirs)]
    assert configs[0] == configs[1]
    assert ours.loss.get_config() == theirs.loss.get_config()
    augmenters = [
        [{**layer.get_config(), "name": type(layer)} for layer in make(0).layers]
        for make in (recipe["augmenter"], data.augmenter)
    ]
    assert augmenters[0] == augmenters[1]
    assert recipe["steps"](1301, 128) == fitting.steps(1301, 128) == 11
    assert recipe["WeightAverage"](40).first == fitting.WeightAverage(40).first == 30
