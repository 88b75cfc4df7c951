"""Every entry point refuses impossible parameters before it does any work.

Each case runs a stage's `main` in-process against a real SQLite store under
tmp_path and checks three things: exit code 2, a message that names the
parameter and what it may be, and no new MLflow run.
"""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import make_tree, sqlite_store

from pipeline import build, cli, config, evaluate, ingest, main, onehot, train, tune

MISSING_RUN = "0123456789abcdef0123456789abcdef"
TOO_BIG_SEED = str(2**32)

# (stage, argv, fragments of the message); {ingest}, {onehot}, {source} and {tmp} are filled in.
CASES = [
    # ingest
    ("ingest", ["--image-size", "16"], ["--image-size", "from 32 to 1024, got 16"]),
    ("ingest", ["--image-size", "0"], ["--image-size", "from 32 to 1024, got 0"]),
    ("ingest", ["--image-size", "4096"], ["--image-size", "from 32 to 1024, got 4096"]),
    ("ingest", ["--val-fraction", "0"], ["--val-fraction", "strictly between 0 and 1, got 0"]),
    ("ingest", ["--val-fraction", "-0.1"], ["--val-fraction", "strictly between 0 and 1"]),
    ("ingest", ["--test-fraction", "1"], ["--test-fraction", "strictly between 0 and 1, got 1"]),
    ("ingest", ["--test-fraction", "nan"], ["--test-fraction", "finite number"]),
    (
        "ingest",
        ["--val-fraction", "0.5", "--test-fraction", "0.5"],
        ["val_fraction + test_fraction = 1", "must be below 1"],
    ),
    ("ingest", ["--max-per-class", "2"], ["max_per_class=2", "0 (all) or at least 3"]),
    ("ingest", ["--max-per-class", "-1"], ["--max-per-class", ">= 0"]),
    ("ingest", ["--seed", "-1"], ["--seed", "from 0 to 4294967295"]),
    ("ingest", ["--seed", TOO_BIG_SEED], ["--seed", "from 0 to 4294967295"]),
    ("ingest", ["--source", "{tmp}/nowhere.zip"], ["source", "nowhere.zip' does not exist"]),
    (
        "ingest",
        ["--source", "ftp://example.com/a.zip"],
        ["source", "only https URLs, .zip files and folders"],
    ),
    ("ingest", ["--source", "{source}", "--sha256", "ab" * 32], ["sha256 applies to archives"]),
    # onehot
    ("onehot", ["--ingest-run-id", MISSING_RUN], ["ingest_run_id", "does not exist", "finished ingest run"]),
    ("onehot", ["--ingest-run-id", "{onehot}"], ["ingest_run_id", "of stage 'onehot', not 'ingest'"]),
    ("onehot", ["--num-classes", "1"], ["--num-classes", ">= 2, got 1"]),
    # build
    ("build", ["--image-size", "31"], ["--image-size", "from 32 to 1024, got 31"]),
    ("build", ["--num-classes", "0"], ["--num-classes", ">= 2, got 0"]),
    # tune
    ("tune", ["--max-trials", "0"], ["--max-trials", ">= 1, got 0"]),
    ("tune", ["--epochs-per-trial", "-3"], ["--epochs-per-trial", ">= 1, got -3"]),
    ("tune", ["--train-epochs", "8"], ["train_epochs=8", "more than epochs_per_trial (8)", "or 0"]),
    ("tune", ["--train-epochs", "-1"], ["--train-epochs", ">= 0, got -1"]),
    ("tune", ["--oracle", "annealing"], ["--oracle", "invalid choice: 'annealing'", "'hyperband'"]),
    ("tune", ["--precision", "float16"], ["--precision", "invalid choice: 'float16'", "'mixed_bfloat16'"]),
    ("tune", ["--seed", TOO_BIG_SEED], ["--seed", "from 0 to 4294967295"]),
    ("tune", ["--onehot-run-id", MISSING_RUN], ["onehot_run_id", "does not exist", "finished onehot run"]),
    ("tune", ["--onehot-run-id", "{ingest}"], ["onehot_run_id", "of stage 'ingest', not 'onehot'"]),
    ("tune", ["--workers", "-1"], ["--workers", ">= 0, got -1"]),
    ("tune", ["--workers", "2", "--onehot-run-id", MISSING_RUN], ["onehot_run_id", "does not exist"]),
    # train
    ("train", ["--epochs", "0"], ["--epochs", ">= 1, got 0"]),
    ("train", ["--test-time-augmentation", "always"], ["--test-time-augmentation", "choice: 'always'"]),
    ("train", ["--batch-size", "0"], ["--batch-size", ">= 1, got 0"]),
    ("train", ["--batch-size", "-64"], ["--batch-size", ">= 1, got -64"]),
    ("train", ["--batch-size", "2.5"], ["--batch-size", "whole number, got 2.5"]),
    ("train", ["--learning-rate", "0"], ["--learning-rate", "strictly between 0 and 1, got 0"]),
    ("train", ["--learning-rate", "-0.001"], ["--learning-rate", "strictly between 0 and 1"]),
    ("train", ["--learning-rate", "1"], ["--learning-rate", "strictly between 0 and 1, got 1"]),
    ("train", ["--learning-rate", "inf"], ["--learning-rate", "finite number"]),
    ("train", ["--patience", "-1"], ["--patience", ">= 0"]),
    ("train", ["--min-epochs", "-1"], ["--min-epochs", ">= 0"]),
    ("train", ["--precision", "half"], ["--precision", "invalid choice: 'half'"]),
    ("train", ["--augment", "sometimes"], ["--augment", "true or false"]),
    ("train", ["--model-name", "team/digits"], ["--model-name", "without '/', ':' or '@'"]),
    ("train", ["--model-name", " "], ["--model-name", "non-empty name"]),
    ("train", ["--onehot-run-id", MISSING_RUN], ["onehot_run_id", "does not exist"]),
    ("train", ["--onehot-run-id", "{ingest}"], ["onehot_run_id", "of stage 'ingest', not 'onehot'"]),
    ("train", ["--tune-run-id", "{ingest}"], ["tune_run_id", "of stage 'ingest', not 'tune'"]),
    ("train", ["--tune-run-id", MISSING_RUN], ["tune_run_id", "does not exist", "finished tune run"]),
    ("train", ["--strategy", "mirrored"], ["--strategy", "invalid choice: 'mirrored'", "'multiworker'"]),
    ("train", ["--strategy", "multiworker", "--workers", "0"], ["--workers", ">= 1, got 0"]),
    (
        "train",
        ["--strategy", "multiworker", "--onehot-run-id", "{ingest}"],
        ["onehot_run_id", "of stage 'ingest', not 'onehot'"],
    ),
    # evaluate
    ("evaluate", ["--model-uri", "models:/nope/1"], ["--model-uri 'models:/nope/1' does not resolve"]),
    ("evaluate", ["--model-uri", "models:/nope@champion"], ["--model-uri", "does not resolve"]),
    ("evaluate", ["--model-uri", "runs:/" + MISSING_RUN + "/model"], ["--model-uri", "does not resolve"]),
    ("evaluate", ["--model-uri", "{tmp}/no-model"], ["--model-uri", "no-model does not exist"]),
    ("evaluate", ["--model-name", "nope"], ["--model-name 'nope'", "has no versions"]),
    ("evaluate", ["--model-name", "a:b"], ["--model-name", "without '/', ':' or '@'"]),
    ("evaluate", ["--min-accuracy", "1.5"], ["--min-accuracy", "between 0 and 1, got 1.5"]),
    ("evaluate", ["--min-accuracy", "-0.5"], ["--min-accuracy", "between 0 and 1"]),
    (
        "evaluate",
        ["--model-uri", "{tmp}", "--ingest-run-id", "{onehot}"],
        ["ingest_run_id", "of stage 'onehot', not 'ingest'"],
    ),
    (
        "evaluate",
        ["--model-uri", "{tmp}", "--ingest-run-id", MISSING_RUN],
        ["ingest_run_id", "does not exist"],
    ),
    # main: every option it passes through, checked before its first step
    ("main", ["--learning-rate", "1.5"], ["--learning-rate", "strictly between 0 and 1, got 1.5"]),
    ("main", ["--learning-rate", "0"], ["--learning-rate", "strictly between 0 and 1, got 0"]),
    ("main", ["--batch-size", "0"], ["--batch-size", ">= 1, got 0"]),
    ("main", ["--epochs", "0"], ["--epochs", ">= 1, got 0"]),
    ("main", ["--epochs-per-trial", "0"], ["--epochs-per-trial", ">= 1, got 0"]),
    ("main", ["--max-trials", "-1"], ["--max-trials", ">= 0, got -1"]),
    ("main", ["--oracle", "annealing"], ["--oracle", "invalid choice: 'annealing'"]),
    ("main", ["--precision", "float16"], ["--precision", "invalid choice: 'float16'"]),
    ("main", ["--image-size", "16"], ["--image-size", "from 32 to 1024, got 16"]),
    ("main", ["--val-fraction", "1.2"], ["--val-fraction", "strictly between 0 and 1, got 1.2"]),
    (
        "main",
        ["--val-fraction", "0.6", "--test-fraction", "0.4"],
        ["val_fraction + test_fraction = 1", "must be below 1"],
    ),
    ("main", ["--max-per-class", "1"], ["max_per_class=1", "0 (all) or at least 3"]),
    ("main", ["--min-accuracy", "2"], ["--min-accuracy", "between 0 and 1, got 2"]),
    ("main", ["--seed", TOO_BIG_SEED], ["--seed", "from 0 to 4294967295"]),
    ("main", ["--model-name", "a@b"], ["--model-name", "without '/', ':' or '@'"]),
    ("main", ["--env-manager", "docker"], ["--env-manager", "invalid choice: 'docker'"]),
    ("main", ["--source", "{tmp}/nowhere"], ["source", "nowhere' does not exist"]),
]

STAGES = {
    "ingest": ingest,
    "onehot": onehot,
    "build": build,
    "tune": tune,
    "train": train,
    "evaluate": evaluate,
    "main": main,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (a fresh one per case costs seconds), with a dataset folder
    and a finished run tagged as each of ingest and onehot (to be passed where they do not belong)."""
    root = tmp_path_factory.mktemp("cli")
    env = {"MLFLOW_EXPERIMENT_NAME": "tests", "SIGN_DIGITS_DATA_DIR": str(root / "input_dataset")}
    with sqlite_store(root, **env):
        experiment = mlflow.set_experiment("tests").experiment_id
        values = {"source": str(make_tree(root / "photos")), "tmp": str(root)}
        for stage in ("ingest", "onehot"):
            with mlflow.start_run(experiment_id=experiment) as run:
                mlflow.set_tag(config.STAGE_TAG, stage)
            values[stage] = run.info.run_id
        yield values


def all_runs() -> set[str]:
    return {run.info.run_id for run in mlflow.search_runs(search_all_experiments=True, output_format="list")}


@pytest.mark.parametrize(
    ("stage", "argv", "fragments"), CASES, ids=[f"{stage}{''.join(argv)}"[:60] for stage, argv, _ in CASES]
)
def test_impossible_values_exit_2_naming_the_parameter_before_any_run(
    stage, argv, fragments, store, capsys, caplog
):
    argv = [arg.format(**store) for arg in argv]
    if stage in ("ingest", "main") and "--source" not in argv:
        argv = ["--source", store["source"], *argv]  # only the value under test is wrong
    before = all_runs()
    with pytest.raises(SystemExit) as exit_info:
        STAGES[stage].main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err + caplog.text
    for fragment in fragments:
        assert fragment in message, message[-2000:]
    assert "Traceback" not in message
    assert all_runs() == before


@pytest.mark.parametrize("value", ["soon", "-1", "inf"])
def test_an_impossible_backup_interval_exits_2_naming_the_variable_before_any_run(
    value, store, monkeypatch, capsys, caplog
):
    monkeypatch.setenv(config.BACKUP_INTERVAL_ENV, value)
    before = all_runs()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--onehot-run-id", store["onehot"]])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err + caplog.text
    assert f"${config.BACKUP_INTERVAL_ENV}={value!r}: must be a number of seconds" in message
    assert all_runs() == before


@pytest.mark.parametrize("text", ["32", "64", "1024", "64.0"])
def test_image_sizes_in_range_are_taken(text):
    assert cli.image_size(text) == int(float(text))


def test_every_stage_with_options_has_a_case():
    assert {stage for stage, _, _ in CASES} == set(STAGES)


# cli.run: a stage's command leaves without Python's teardown, losing nothing

COMMAND = """
import atexit, logging, sys
from pathlib import Path
from pipeline import cli
from pipeline.errors import PipelineError

atexit.register(Path(sys.argv[1]).write_text, "atexit ran")

@cli.entry_point
def main(argv=None):
    logging.getLogger("pipeline.probe").info("logged line")
    print("printed without a newline", end="")
    if sys.argv[2] == "fail":
        raise PipelineError("the probe failed")

cli.run(main)
print("never printed")
"""


@pytest.mark.parametrize("outcome, code", [("succeed", 0), ("fail", 2)])
def test_a_command_ends_with_its_output_and_exit_handlers(tmp_path, outcome, code):
    root = Path(__file__).resolve().parents[1]
    marker = tmp_path / "atexit.txt"
    done = subprocess.run(
        [sys.executable, "-c", COMMAND, str(marker), outcome],
        capture_output=True,
        text=True,
        cwd=root,
        env={key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"},  # a pipe buffers
        timeout=120,
    )
    assert done.returncode == code, done.stderr
    assert done.stdout == "printed without a newline"  # flushed, and nothing after cli.run
    assert "pipeline.probe: logged line" in done.stderr
    assert marker.read_text() == "atexit ran"
    assert ("the probe failed" in done.stderr) == (outcome == "fail")
