"""The tune stage: the hyperparameter space, what reaches training, MLflow runs per trial, resume."""

import json
import math
import os
from pathlib import Path

import keras
import keras_tuner
import mlflow
import pandas as pd
import pytest
import tensorflow as tf
from conftest import make_tree

from pipeline import config, fitting, ingest, onehot, tune
from pipeline.errors import PipelineError

EPOCHS = 1


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    """20 training and 10 validation photos of 32x32 (4 per digit, ingested for real)."""
    root = tmp_path_factory.mktemp("tune-data")
    source = make_tree(root / "photos", per_class=4)
    result = ingest.run(str(source), root / "ingest", image_size=32, data_dir=root / "cache")
    encoded = {f"y_{split}": onehot.encode(result.arrays[f"y_{split}"]) for split in config.SPLITS}
    return {**{f"x_{split}": result.arrays[f"x_{split}"] for split in config.SPLITS}, **encoded}


@pytest.fixture(autouse=True)
def tuner_dir(tmp_path, monkeypatch):
    """Keras Tuner state under tmp_path; the global dtype policy back to float32 afterwards."""
    monkeypatch.setenv(config.TUNER_DIR_ENV, str(tmp_path / "tuner"))
    yield tmp_path / "tuner"
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def eager():
    """Every tf.function eager in this process too, not only the train step (conftest):
    tracing ResNet50 costs 30-90 s per process on 2 cores, against ~10 s for a whole eager
    1-epoch trial on these 20 photos. Searches in graph mode (the production path) are
    measured outside the suite."""
    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


@pytest.fixture
def onehot_run(mlflow_store, tmp_path):
    """A finished ingest and onehot run over the small photos, in the test store."""
    source = make_tree(tmp_path / "photos", per_class=4)
    ingest.main(["--source", str(source), "--image-size", "32"])
    onehot.main([])
    return stage_runs("onehot")[0]


def stage_runs(stage):
    return mlflow.search_runs(
        experiment_names=["tests"],
        filter_string=f"tags.`{config.STAGE_TAG}` = '{stage}'",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )


def children(parent):
    return mlflow.search_runs(
        experiment_names=["tests"],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        output_format="list",
    )


def artifact(run, name):
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=f"{config.TUNE_ARTIFACT}/{name}"
        )
    )


def hyperparameters(**values):
    hp = keras_tuner.HyperParameters()
    tune.ResNetHyperModel({}, EPOCHS).declare_hyperparameters(hp)
    hp.values.update(values)
    return hp


def tiny_model():
    model = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, "softmax")]
    )
    model.compile("sgd", "categorical_crossentropy", metrics=["accuracy"])
    return model


def tune_main(*options):
    tune.main(["--epochs-per-trial", str(EPOCHS), "--precision", "float32", *options])


# Unit


def test_both_hyperparameters_are_declared_before_any_build():
    space = {hp.name: hp for hp in hyperparameters().space}
    assert set(space) == {"learning_rate", "batch_size"}
    rate = space["learning_rate"]
    assert isinstance(rate, keras_tuner.engine.hyperparameters.Float)
    assert (rate.min_value, rate.max_value) == config.LEARNING_RATE_RANGE and rate.sampling == "log"
    assert list(space["batch_size"].values) == list(config.BATCH_SIZES)


@pytest.mark.parametrize("batch_size", [16, 32])
def test_the_trial_batch_size_batches_fit_and_kwargs_pass_through(arrays, batch_size):
    hypermodel = tune.ResNetHyperModel(arrays, EPOCHS, augment=True)
    seen = []
    callback = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(epoch))
    history = hypermodel.fit(
        hyperparameters(batch_size=batch_size), tiny_model(), epochs=2, callbacks=[callback], verbose=0
    )
    assert history.params["steps"] == math.ceil(len(arrays["x_train"]) / batch_size)
    assert seen == [0, 1] and set(history.history) >= {"loss", "val_accuracy"}


@pytest.mark.slow
def test_build_compiles_the_trial_learning_rate_and_keeps_precision_after_clear_session(arrays):
    hypermodel = tune.ResNetHyperModel(arrays, epochs=3, precision="mixed_bfloat16")
    keras.backend.clear_session()  # Keras Tuner does this before every build; it resets the dtype policy
    model = hypermodel.build(hyperparameters(learning_rate=2e-4, batch_size=16))
    assert model.get_layer("res2a_branch2a").dtype_policy.name == "mixed_bfloat16"
    schedule = keras.optimizers.schedules.deserialize(model.optimizer.get_config()["learning_rate"])
    total = math.ceil(len(arrays["x_train"]) / 16) * 3
    assert schedule.warmup_steps + schedule.decay_steps == total
    peak = max(float(schedule(step)) for step in range(total + 1))
    assert peak == pytest.approx(2e-4)


def test_project_name_names_the_search_but_not_its_budget(arrays):
    base = {"oracle": "bayesian", "epochs_per_trial": 8, "seed": 42, "augment": True, "precision": "float32"}
    name = tune.project_name(arrays, **base, project_key="run-a")
    assert name == tune.project_name(arrays, **base, project_key="run-a")
    assert name.startswith("bayesian-")
    changes = [
        {"seed": 43},
        {"oracle": "random"},
        {"epochs_per_trial": 9},
        {"augment": False},
        {"precision": "mixed_bfloat16"},
    ]
    others = {tune.project_name(arrays, **{**base, **change}, project_key="run-a") for change in changes}
    others.add(tune.project_name(arrays, **base, project_key="run-b"))
    others.add(tune.project_name({**arrays, "x_train": arrays["x_train"][:-1]}, **base, project_key="run-a"))
    assert len(others) == len(changes) + 2 and name not in others


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--oracle", "annealing"], "--oracle: invalid choice: 'annealing'"),
        (["--max-trials", "0"], "--max-trials: must be a whole number >= 1"),
        (["--epochs-per-trial", "0"], "--epochs-per-trial: must be a whole number >= 1"),
        (["--augment", "maybe"], "--augment: must be true or false"),
        (["--precision", "float16"], "--precision: invalid choice"),
    ],
)
def test_bad_options_exit_2_naming_the_option_and_log_nothing(mlflow_store, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        tune.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"oracle": "annealing"}, "oracle"),
        ({"max_trials": 0}, "max_trials"),
        ({"epochs_per_trial": 0}, "epochs"),
    ],
)
def test_run_refuses_impossible_parameters_before_any_work(arrays, tmp_path, tuner_dir, options, name):
    with pytest.raises(PipelineError, match=name):
        tune.run(arrays, tmp_path / "out", **options)
    assert not tuner_dir.exists() and not (tmp_path / "out").exists()


def test_a_broken_search_state_asks_for_resume_false(mlflow_store, arrays, tmp_path, tuner_dir):
    project = tuner_dir / tune.project_name(arrays, "random", EPOCHS, config.SEED, config.AUGMENT, "float32")
    project.mkdir(parents=True)
    for name in ("oracle.json", "tuner0.json"):
        (project / name).write_text('{"ongoing_trials": ')
    with pytest.raises(PipelineError, match=f"{project.name}.*resume=false"):
        tune.run(arrays, tmp_path / "out", oracle="random", epochs_per_trial=EPOCHS, precision="float32")


@pytest.mark.slow
def test_failing_trial_processes_fail_their_runs_and_stop_the_search(mlflow_store, arrays, tmp_path):
    # The trial's process refuses the precision: a real child failing, not a mock.
    broken = tune.ResNetHyperModel(arrays, EPOCHS, precision="float16")
    tuner = tune.make_tuner("random", broken, 5, EPOCHS, 0, tmp_path / "tuner", "broken", True)
    with (
        mlflow.start_run() as parent,
        pytest.raises(PipelineError, match="consecutive failures.*exited with code 2.*precision='float16'"),
    ):
        tune.search(tuner, EPOCHS)
    runs = children(parent)
    assert len(runs) == 3
    assert {run.info.status for run in runs} == {"FAILED"}
    assert all(run.data.metrics["rss_mib"] > 0 for run in runs)


def test_a_kill_between_keras_tuners_two_writes_is_repaired_on_reload(arrays, tmp_path):
    """Keras Tuner writes trial.json, then oracle.json: a kill in between leaves them disagreeing."""
    tuner = tune.make_tuner(
        "random", tune.ResNetHyperModel(arrays, EPOCHS), 3, EPOCHS, 0, tmp_path, "p", True
    )
    oracle = tuner.oracle
    done = oracle.create_trial("tuner0")  # trial 0 starts: both files say so
    tuner.save()  # as MlflowTrials does when it opens the trial's run
    oracle.update_trial(done.trial_id, {tune.OBJECTIVE: 0.5})
    done.status = "COMPLETED"
    oracle.score_trial(done)
    oracle._save_trial(done)  # killed here: oracle.json still has trial 0 running
    started = json.loads((Path(oracle._get_trial_dir("0")) / "trial.json").read_text())
    started.update(trial_id="1", status="RUNNING", score=None, metrics={"metrics": {}})
    started["hyperparameters"]["values"]["batch_size"] = 16
    Path(oracle._get_trial_dir("1"), "trial.json").write_text(
        json.dumps(started)
    )  # killed before oracle.json
    reloaded = tune.make_tuner(
        "random", tune.ResNetHyperModel(arrays, EPOCHS), 3, EPOCHS, 0, tmp_path, "p", False
    )
    oracle = reloaded.oracle
    assert oracle._retry_queue == ["1"] and oracle.end_order == ["0"]
    assert oracle.trials["0"].status == "COMPLETED" and oracle.trials["0"].score == 0.5
    again = oracle.create_trial("tuner0")
    assert again.trial_id == "1" and not again.metrics.exists(tune.OBJECTIVE)


def test_keras_tuner_json_is_written_atomically(tmp_path):
    from keras_tuner.src import utils

    path = tmp_path / "oracle.json"
    utils.save_json(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == [
        "oracle.json"
    ]
    assert utils.save_json is tune._save_json_atomically


# Integration


@pytest.mark.slow
def test_search_logs_a_parent_run_and_one_child_run_per_trial(onehot_run, eager, tuner_dir):
    tune_main("--max-trials", "2", "--train-epochs", str(config.EPOCHS))
    (parent,) = stage_runs("tune")
    num_train = stage_runs("ingest")[0].data.metrics["num_train"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[config.ONEHOT_RUN_TAG] == onehot_run.info.run_id
    runs = children(parent)
    assert len(runs) == 2
    client = mlflow.MlflowClient()
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags[config.STAGE_TAG] == "tune-trial"
        assert run.data.tags[tune.TRIAL_ID_TAG] in {"0", "1"}
        for machine_tag in (config.PROCESSOR_TAG, config.BFLOAT16_TAG, config.THREADS_TAG):
            assert run.data.tags[machine_tag] == parent.data.tags[machine_tag]
        assert float(run.data.params["learning_rate"]) > 0
        assert int(run.data.params["batch_size"]) in config.BATCH_SIZES
        assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == EPOCHS
        assert run.data.metrics["rss_mib"] > 100
        # The trial trained in a process of its own, with the trial's batch size.
        assert int(run.data.tags[tune.TRIAL_PID_TAG]) != os.getpid()
        assert run.data.metrics["trial_peak_rss_mib"] > 100
        batches = math.ceil(num_train / int(run.data.params["batch_size"]))
        assert run.data.metrics["steps_per_epoch"] == batches
    assert {run.data.tags[tune.TRIAL_ID_TAG] for run in runs} == {"0", "1"}
    best = json.loads(artifact(parent, config.BEST_PARAMS_FILE).read_text())
    assert set(best) == {"learning_rate", "batch_size"}
    assert parent.data.params["best_learning_rate"] == str(best["learning_rate"])
    assert parent.data.params["best_batch_size"] == str(best["batch_size"])
    assert 0 <= parent.data.metrics["best_val_accuracy"] <= 1
    trials = pd.read_csv(artifact(parent, config.TRIALS_FILE), dtype={"trial_id": str})
    assert list(trials.columns) == tune.TRIAL_COLUMNS
    assert len(trials) == 2 and set(trials["status"]) == {"COMPLETED"}
    assert set(trials["run_id"]) == {run.info.run_id for run in runs}
    assert artifact(parent, config.TRIALS_PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One training state is kept, the best trial's, with the training it is the start of.
    key = json.loads(artifact(parent, f"{config.BEST_TRIAL_DIR}/{config.TRAINING_KEY_FILE}").read_text())
    assert key["trial_run_id"] in set(trials["run_id"])
    assert (key["learning_rate"], key["batch_size"]) == (best["learning_rate"], best["batch_size"])
    assert key["onehot_run_id"] == onehot_run.info.run_id and key["epochs"] == config.EPOCHS
    assert not list(tuner_dir.glob(f"*/trial_*/{tune.STATE_DIR}"))


@pytest.mark.slow
def test_resume_runs_only_new_trials_and_no_resume_starts_over(onehot_run, eager, tuner_dir):
    tune_main("--max-trials", "1", "--oracle", "random")
    tune_main("--max-trials", "2", "--oracle", "random", "--resume", "true")
    first, second = stage_runs("tune")
    assert [run.data.tags[tune.TRIAL_ID_TAG] for run in children(first)] == ["0"]
    # By default a trial's schedule ends with it: no training state is kept or logged.
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(first.info.run_id, config.TUNE_ARTIFACT)}
    assert f"{config.TUNE_ARTIFACT}/{config.BEST_TRIAL_DIR}" not in logged and len(logged) == 3
    assert not list(tuner_dir.glob(f"*/trial_*/{tune.STATE_DIR}"))
    assert [run.data.tags[tune.TRIAL_ID_TAG] for run in children(second)] == ["1"]
    assert second.data.metrics["num_new_trials"] == 1 and second.data.metrics["num_trials"] == 2
    trials = pd.read_csv(artifact(second, config.TRIALS_FILE), dtype={"trial_id": str})
    assert list(trials["trial_id"]) == ["0", "1"]
    assert list(trials["run_id"]) == [children(first)[0].info.run_id, children(second)[0].info.run_id]
    # Without resume the same search starts from trial 0 again, in the same folder.
    tune_main("--max-trials", "1", "--oracle", "random", "--resume", "false")
    third = stage_runs("tune")[2]
    assert [run.data.tags[tune.TRIAL_ID_TAG] for run in children(third)] == ["0"]
    assert third.data.tags[tune.PROJECT_TAG] == first.data.tags[tune.PROJECT_TAG]
    assert [path.name for path in tuner_dir.iterdir() if path.suffix != ".lock"] == [
        first.data.tags[tune.PROJECT_TAG]
    ]


@pytest.mark.parametrize("oracle", ["bayesian", "random", "grid"])
def test_a_search_tries_the_untuned_recipe_first_then_other_values(tmp_path, oracle):
    tuner = tune.make_tuner(oracle, tune.ResNetHyperModel({}, EPOCHS), 4, EPOCHS, 42, tmp_path, "p", True)
    first = tuner.oracle.create_trial("tuner0")
    defaults = {"learning_rate": config.LEARNING_RATE, "batch_size": config.BATCH_SIZE}
    assert first.hyperparameters.values == defaults
    tuner.oracle.update_trial(first.trial_id, {tune.OBJECTIVE: 0.5})
    first.status = "COMPLETED"
    tuner.oracle.end_trial(first)
    second = tuner.oracle.create_trial("tuner0")
    assert second.status == "RUNNING" and second.hyperparameters.values != defaults


@pytest.mark.slow
@pytest.mark.parametrize("oracle", ["random", "grid", "hyperband"])
def test_each_oracle_runs_a_one_trial_search(mlflow_store, arrays, eager, tmp_path, oracle):
    with mlflow.start_run() as parent:
        result = tune.run(
            arrays,
            tmp_path / "out",
            oracle=oracle,
            max_trials=1,
            epochs_per_trial=EPOCHS,
            precision="float32",
            train_epochs=config.EPOCHS,
        )
    trials = result["trials"]
    assert len(trials) == 1 and trials.loc[0, "status"] == "COMPLETED" and trials.loc[0, "epochs"] == EPOCHS
    assert trials.loc[0, "run_id"] == children(parent)[0].info.run_id
    if oracle == "grid":  # the grid starts at the defaults
        assert result["best_params"] == {
            "learning_rate": config.LEARNING_RATE,
            "batch_size": config.BATCH_SIZE,
        }
    checkpoints = list(Path(result["project_dir"]).glob("trial_*/checkpoint*"))
    assert len(checkpoints) == (1 if oracle == "hyperband" else 0)  # only Hyperband reads them again
    # The best trial's state, for train to continue; Hyperband's trials are no training's start.
    state = {config.BEST_TRIAL_DIR} if oracle != "hyperband" else set()
    assert {path.name for path in (tmp_path / "out").iterdir()} == {
        config.BEST_PARAMS_FILE,
        config.TRIALS_FILE,
        config.TRIALS_PLOT_FILE,
        *state,
    }
    assert not list(Path(result["project_dir"]).glob(f"trial_*/{tune.STATE_DIR}"))  # moved, not copied
    if state:
        assert fitting.Backup.read(result["best_state"])["epoch"] == EPOCHS
        key = json.loads((result["best_state"] / config.TRAINING_KEY_FILE).read_text())
        assert key["epochs"] == config.EPOCHS and key["batch_size"] == result["best_params"]["batch_size"]
        assert key["trial_run_id"] == trials.loc[0, "run_id"]
