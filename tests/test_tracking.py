"""Stage runs: tags, statuses, params, and upstream look-ups on a real SQLite store."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline import config, tracking
from pipeline.errors import PipelineError


def test_stage_run_tags_stage_and_code_version(mlflow_store):
    with tracking_run("ingest", {"seed": 1}) as run:
        run_id = run.info.run_id
    stored = mlflow.get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.tags[config.STAGE_TAG] == "ingest"
    assert len(stored.data.tags[config.COMMIT_TAG]) in (40, len("unknown"))
    assert stored.data.tags[config.DIRTY_TAG] in ("true", "false", "unknown")
    assert stored.data.params == {"seed": "1"}
    assert mlflow.get_experiment(stored.info.experiment_id).name == "tests"


def test_stage_runs_name_the_processor_and_tensorflow_threads(mlflow_store, monkeypatch):
    # A seed repeats a training only on the same processor with as many TensorFlow threads.
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines[: lines.index("")] if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    name = f"{fields['model name']} (cpu family {fields['cpu family']}, model {fields['model']})"
    flags = set(next(line for line in lines if line.startswith("flags")).split())
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "1")
    with tracking_run("ingest", {}) as run:
        pinned = run.info.run_id
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS")
    with tracking_run("ingest", {}) as run:
        default = run.info.run_id
    tags = mlflow.get_run(pinned).data.tags
    assert tags[config.PROCESSOR_TAG] == name
    assert set(tags[config.BFLOAT16_TAG].split("+")) == ({"amx_bf16", "avx512_bf16"} & flags or {"none"})
    assert tags[config.THREADS_TAG] == "1"
    assert mlflow.get_run(default).data.tags[config.THREADS_TAG] == str(len(os.sched_getaffinity(0)))


STAGE_HOLDING_MEMORY = """
import sys
import numpy as np
from pipeline import tracking
with tracking.stage_run("ingest", {}) as run:
    held = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MiB, every page touched
    print(run.info.run_id)
    if sys.argv[1] == "fail":
        raise RuntimeError("stage failed")
"""


# Started from a process holding 1 GiB, as `main` or `mlflow run` start a stage.
LAUNCHER_HOLDING_MEMORY = """
import subprocess, sys
import numpy as np
held = np.ones(1024 * 2**20, dtype=np.uint8)
sys.exit(subprocess.run([sys.executable, "-c", sys.argv[1], sys.argv[2]]).returncode)
"""


@pytest.mark.parametrize("outcome", ["finish", "fail"])
def test_stage_run_logs_the_peak_resident_memory_of_its_process(mlflow_store, outcome):
    child = subprocess.run(
        [sys.executable, "-c", LAUNCHER_HOLDING_MEMORY, STAGE_HOLDING_MEMORY, outcome],
        capture_output=True,
        text=True,
        cwd=Path.cwd(),
        env={**os.environ, "PYTHONPATH": str(Path(tracking.__file__).parents[1])},
    )
    assert child.returncode == (0 if outcome == "finish" else 1), child.stderr
    run = mlflow.get_run(child.stdout.split()[-1])
    assert run.info.status == {"finish": "FINISHED", "fail": "FAILED"}[outcome]
    # 300 MiB held, on top of Python with MLflow and NumPy imported (~150-250 MiB); not the
    # launcher's GiB, which Linux's ru_maxrss carries across exec.
    assert 300 < run.data.metrics[config.PEAK_RSS_METRIC] < 1024


def test_processor_name_carries_family_and_model_numbers():
    # Virtual machines show a generic name for processors of different generations.
    generic = {"model name": "AMD EPYC Processor", "cpu family": "25", "model": "17"}
    assert tracking.processor_name(generic) == "AMD EPYC Processor (cpu family 25, model 17)"
    assert tracking.processor_name({"model name": "Apple M2"}) == "Apple M2"


def tracking_run(stage, params):
    return tracking.stage_run(stage, params)


def test_failed_stage_ends_failed_and_ctrl_c_ends_killed(mlflow_store):
    with pytest.raises(PipelineError), tracking_run("ingest", {}) as run:
        failed = run.info.run_id
        raise PipelineError("boom")
    with pytest.raises(KeyboardInterrupt), tracking_run("ingest", {}) as run:
        killed = run.info.run_id
        raise KeyboardInterrupt
    assert mlflow.get_run(failed).info.status == "FAILED"
    assert mlflow.get_run(killed).info.status == "KILLED"
    assert mlflow.active_run() is None


def test_params_already_logged_are_kept(mlflow_store):
    with tracking_run("ingest", {"val_fraction": ".15"}) as run:
        tracking.log_new_params(run, {"val_fraction": 0.15, "seed": 3})
    assert mlflow.get_run(run.info.run_id).data.params == {"val_fraction": ".15", "seed": "3"}


def test_find_run_takes_the_latest_finished_run_of_the_stage(mlflow_store):
    with tracking_run("ingest", {}) as first:
        pass
    with tracking_run("ingest", {}) as second:
        pass
    with pytest.raises(PipelineError), tracking_run("ingest", {}):
        raise PipelineError("fails")
    with tracking_run("onehot", {}):
        pass
    assert tracking.find_run("ingest", "").info.run_id == second.info.run_id
    assert tracking.find_run("ingest", first.info.run_id).info.run_id == first.info.run_id


def test_find_run_rejects_unknown_wrong_stage_and_unfinished_runs(mlflow_store):
    with tracking_run("onehot", {}) as onehot_run:
        pass
    with pytest.raises(PipelineError), tracking_run("ingest", {}) as failed:
        raise PipelineError("fails")
    with pytest.raises(PipelineError, match="does not exist"):
        tracking.find_run("ingest", "0123456789abcdef0123456789abcdef")
    with pytest.raises(PipelineError, match="is of stage 'onehot', not 'ingest'"):
        tracking.find_run("ingest", onehot_run.info.run_id)
    with pytest.raises(PipelineError, match="FAILED, not FINISHED"):
        tracking.find_run("ingest", failed.info.run_id)


def test_find_run_without_any_run_says_what_to_do(mlflow_store):
    with tracking_run("onehot", {}):
        pass
    with pytest.raises(PipelineError, match=r"no finished ingest run.*mlflow run . -e ingest"):
        tracking.find_run("ingest", "")


def test_default_tracking_uri_is_sqlite_and_the_variable_wins(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert config.tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert config.tracking_uri() == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("sqlite:///mlflow.db", "{cwd}/mlflow.db"),
        ("sqlite:////data/runs/mlflow.db", "/data/runs/mlflow.db"),
        ("sqlite:///store.db?timeout=30", "{cwd}/store.db"),
        ("sqlite:///:memory:", None),
        ("sqlite://", None),
        ("http://127.0.0.1:5000", None),
        ("postgresql://user@host/mlflow", None),
    ],
)
def test_the_sqlite_file_is_found_for_the_creation_lock(uri, path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = tracking._sqlite_path(uri)
    assert found == (None if path is None else Path(path.format(cwd=tmp_path.resolve())))


def test_a_new_store_is_created_under_a_lock_next_to_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    tracking.configure()
    assert (tmp_path / "new" / "mlflow.db").is_file()
    assert (tmp_path / "new" / "mlflow.db-init.lock").is_file()  # .gitignore's mlflow.db-* covers it
    assert mlflow.search_experiments()  # the tables exist: MLflow's Default experiment


def test_runs_left_running_by_a_process_that_is_gone_are_marked_killed(mlflow_store):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = tracking.process_id(child.pid)
    child.kill()
    child.wait()
    host, pid, started = tracking.process_id().split(":")
    processes = {
        "gone": gone,
        "pid_reused": f"{host}:{pid}:{int(started) + 1}",  # our pid, but another process's start
        "alive": tracking.process_id(),
        "elsewhere": "another-host:1:1",
        "untagged": None,
    }
    experiment = mlflow.set_experiment("tests").experiment_id
    client = mlflow.MlflowClient()
    runs = {}
    for name, process in processes.items():
        runs[name] = client.create_run(experiment).info.run_id  # RUNNING until ended
        if process:
            client.set_tag(runs[name], config.PROCESS_TAG, process)
    assert not tracking.process_alive(gone) and tracking.process_alive(tracking.process_id())
    assert sorted(tracking.end_dead_runs(experiment)) == sorted([runs["gone"], runs["pid_reused"]])
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {
        "gone": "KILLED",
        "pid_reused": "KILLED",
        "alive": "RUNNING",
        "elsewhere": "RUNNING",
        "untagged": "RUNNING",
    }


def test_stage_run_continues_a_given_run_and_tags_its_process(mlflow_store):
    with pytest.raises(KeyboardInterrupt), tracking_run("train", {"epochs": 3}) as run:
        first = run.info.run_id
        raise KeyboardInterrupt
    with tracking.stage_run("train", {"epochs": 3}, run_id=first) as run:
        assert run.info.run_id == first
    stored = mlflow.get_run(first)
    assert stored.info.status == "FINISHED"
    assert stored.data.tags[config.PROCESS_TAG] == tracking.process_id()
