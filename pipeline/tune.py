"""Tune: a Keras Tuner search over learning rate and batch size, one MLflow child run per trial.

Every trial trains the same ResNet50 recipe (pipeline.fitting) from the same seed, so
trials differ only in the two hyperparameters. With `train_epochs`, a trial is the first
`epochs_per_trial` epochs of a `train_epochs`-epoch training (its learning-rate schedule
spans them all), and the best trial's state is logged for `train --tune-run-id` to
continue rather than repeat; a resumed search whose best trial was logged by an earlier
tune run has none to log. The search state lives under
config.tuner_dir()/<project>, where <project> is a hash of what defines the search;
running again with the same parameters continues it (see `project_name`).

Budgets per oracle: bayesian, random and grid run up to `max_trials` trials of
`epochs_per_trial` epochs. Hyperband ignores `max_trials`: `epochs_per_trial` is its
`max_epochs` (the most any model trains) and its brackets (factor 3, one iteration)
decide the number of trials, e.g. 10 trials and 49 epochs in all for 8 epochs, 1 trial
for 1 epoch. Hyperband continues a promoted trial from its predecessor's best weights;
the optimizer and its learning-rate schedule start afresh, as Keras Tuner restores
weights only.

Each trial trains in a child process (pipeline.trial), so the search's own memory
stays flat. A search killed at any point (SIGKILL, Ctrl-C, a power cut) continues
when run again with the same parameters: finished trials are kept, the interrupted
one runs again, and the MLflow runs it left open are ended (see `MlflowTrials`).
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# A distributed worker talks gRPC to the chief and forks each trial's process (trial.py's
# preexec_fn rules out vfork); gRPC's fork handlers then restart its poller in the child,
# which aborted a trial in 2 of 6 test searches here ("epoll_wait error: Bad file descriptor").
# The child execs a fresh Python at once and needs none of them. Read when gRPC starts.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import keras  # noqa: E402
import keras_tuner  # noqa: E402
import mlflow
import numpy as np
import pandas as pd
from keras_tuner.src import utils as keras_tuner_utils
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException

from pipeline import cli, cluster, config, data, files, fitting, tracking
from pipeline import trial as trial_process
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.tune")

PROJECT_TAG = "pipeline.tuner_project"
TRIAL_ID_TAG = "pipeline.trial_id"
TRIAL_PID_TAG = "pipeline.trial_pid"
TUNER_ID_TAG = "pipeline.tuner_id"  # which Keras Tuner worker ran the trial
ARRAYS_FILE = "arrays-{tuner_id}.npz"  # one per worker: each removes its own when it ends
TRIAL_STAGE = "tune-trial"
OBJECTIVE = "val_accuracy"
KEY_VERSION = 2  # bump when a change to the training step or the oracles makes old trials incomparable
NOT_SEARCH_OPTIONS = ("onehot_run_id", "workers", "parent_run_id")  # options of main, not of run()
STATE_DIR = "state"  # in a trial's folder: its training state after its last epoch (see `_spec`)
TRIAL_COLUMNS = ["trial_id", "status", "learning_rate", "batch_size", "epochs", OBJECTIVE, "run_id"]


class ResNetHyperModel(keras_tuner.HyperModel):
    """fitting.new_model with a tuned learning rate and batch size.

    `arrays` holds x_train/y_train/x_val/y_val (uint8 images, one-hot labels). `build`
    compiles for `epochs` epochs; `fit` feeds tf.data pipelines batched by the trial's
    batch size and passes the tuner's keyword arguments (epochs, callbacks) to model.fit.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        epochs: int,
        augment: bool = config.AUGMENT,
        seed: int = config.SEED,
        precision: str = "float32",
    ):
        super().__init__(name="resnet50")
        self.arrays = arrays
        self.epochs = epochs
        self.augment = augment
        self.seed = seed
        self.precision = precision

    def declare_hyperparameters(self, hp: keras_tuner.HyperParameters) -> None:
        hp.Float("learning_rate", *config.LEARNING_RATE_RANGE, sampling="log", default=config.LEARNING_RATE)
        hp.Choice("batch_size", list(config.BATCH_SIZES), default=config.BATCH_SIZE)

    def build(self, hp: keras_tuner.HyperParameters) -> keras.Model:
        self.declare_hyperparameters(hp)
        # Keras Tuner clears the Keras session before each build, which also resets the
        # global dtype policy and seed: set both again so every trial starts alike.
        fitting.set_precision(self.precision)
        keras.utils.set_random_seed(self.seed)
        x_train, y_train = self.arrays["x_train"], self.arrays["y_train"]
        model = fitting.new_model(x_train.shape[1], y_train.shape[1])
        steps = fitting.steps(len(x_train), hp.get("batch_size"))
        return fitting.compile_model(model, hp.get("learning_rate"), steps, self.epochs)

    def fit(self, hp: keras_tuner.HyperParameters, model: keras.Model, *args, **kwargs):
        batch_size = hp.get("batch_size")
        x_train = self.arrays["x_train"]
        train = data.dataset(
            x_train,
            self.arrays["y_train"],
            batch_size,
            training=True,
            augment=self.augment,
            seed=self.seed,
            endless=True,
        )
        val = data.dataset(self.arrays["x_val"], self.arrays["y_val"], batch_size)  # finite: see data.dataset
        # The dataset shuffles itself; Keras' own shuffle only warns on a tf.data input.
        return model.fit(
            train,
            steps_per_epoch=fitting.steps(len(x_train), batch_size),
            validation_data=val,
            shuffle=False,
            **kwargs,
        )


class MlflowTrials:
    """Mixed into a Keras Tuner class: each trial is a nested MLflow run of the active run,
    trained in a child process (pipeline.trial).

    This process keeps Keras Tuner's bookkeeping and never builds a model: each trial's
    child loads the search's arrays (ARRAYS_FILE in the project folder), logs its epochs
    to the trial's run and hands back its history. Keras Tuner saves a trial's best
    weights only for Hyperband, which continues promoted trials from them.

    The trials' run ids are kept in the tuner's own state, saved as each trial starts,
    so a resumed search knows them all. The trial's run ends after Keras Tuner has
    recorded the trial: a kill in between leaves a completed trial whose run a resumed
    search ends FINISHED; a trial that was running is run again and its old run ends KILLED.
    """

    keep_checkpoints = False
    parent_run_id: str | None = None  # a distributed worker's search run; else the active run

    def __init__(self, *args, **kwargs):
        self.trial_runs: dict[str, str] = {}
        self._open_run: str | None = None
        super().__init__(*args, **kwargs)

    def _populate_initial_space(self):
        # Keras Tuner builds the model once here to discover conditional hyperparameters.
        # There are none, and a model built here would cost this process ~0.5 GiB for good.
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def reload(self):
        super().reload()
        recover_interrupted_trials(self.oracle)

    def on_search_begin(self):
        super().on_search_begin()
        self._end_orphaned_runs()
        arrays = {key: self.hypermodel.arrays[key] for key in ("x_train", "y_train", "x_val", "y_val")}
        with files.replacing(self._arrays_path()) as temporary:
            np.savez(temporary, **arrays)

    def on_search_end(self):
        self._arrays_path().unlink(missing_ok=True)
        super().on_search_end()

    def run_trial(self, trial, *args, **kwargs):
        values = trial.hyperparameters.values
        run = self._start_run(trial)
        log.info("trial %s: %s", trial.trial_id, ", ".join(f"{k}={v}" for k, v in values.items()))
        try:
            mlflow.log_params(values)
            spec = self._spec(trial, run.info.run_id, kwargs)
            result = trial_process.run(spec, Path(self.get_trial_dir(trial.trial_id)))
            history = keras.callbacks.History()
            history.history = result["history"]
            best, memory = max(history.history[OBJECTIVE]), rss_mib()
            mlflow.set_tag(TRIAL_PID_TAG, str(result["pid"]))
            mlflow.log_metrics(
                {
                    f"best_{OBJECTIVE}": best,
                    "rss_mib": memory,
                    "trial_peak_rss_mib": result["peak_rss_mib"],
                    "steps_per_epoch": result["steps"],
                }
            )
        except KeyboardInterrupt:
            self._end_run(RunStatus.KILLED)
            raise
        except BaseException:
            mlflow.log_metric("rss_mib", rss_mib())
            self._end_run(RunStatus.FAILED)
            raise
        log.info(
            "trial %s: best %s %.4f; %.0f MiB resident here, %.0f MiB at most in its process",
            trial.trial_id,
            OBJECTIVE,
            best,
            memory,
            result["peak_rss_mib"],
        )
        return [history]

    def on_trial_end(self, trial):
        super().on_trial_end(trial)  # Keras Tuner records the trial first
        self._end_run(RunStatus.FINISHED if trial.status == "COMPLETED" else RunStatus.FAILED)
        if not self._is_worker():  # a worker's oracle is the chief's; the chief prunes at the end
            self.keep_best_state()

    def keep_best_state(self) -> Path | None:
        """Remove the training states of all finished trials but the best; return its folder
        (None when it left none). A state is ~284 MB: one is kept, not one per trial."""
        best = self.oracle.get_best_trials(1)
        keep = best[0].trial_id if best else None
        for trial_id, trial in self.oracle.trials.items():
            if trial_id != keep and trial.status != "RUNNING":
                shutil.rmtree(self.state_dir(trial_id), ignore_errors=True)
        if keep is None or fitting.Backup.read(self.state_dir(keep)) is None:
            return None
        return self.state_dir(keep)

    def state_dir(self, trial_id: str) -> Path:
        return Path(self.get_trial_dir(trial_id)) / STATE_DIR

    def _start_run(self, trial):
        parent = mlflow.active_run()
        run = mlflow.start_run(
            nested=True,
            parent_run_id=self.parent_run_id,
            run_name=f"trial-{trial.trial_id}",
            experiment_id=parent.info.experiment_id if parent else None,
            tags={
                config.STAGE_TAG: TRIAL_STAGE,
                TRIAL_ID_TAG: trial.trial_id,
                TUNER_ID_TAG: self.tuner_id,
                PROJECT_TAG: self.project_name,
                config.PROCESS_TAG: tracking.process_id(),
                **tracking.machine_tags(),
            },
        )
        self.trial_runs[trial.trial_id] = self._open_run = run.info.run_id
        self.save()  # so that a resumed search knows this run, whatever happens next
        return run

    def _end_run(self, status: int) -> None:
        if self._open_run is not None:
            mlflow.end_run(RunStatus.to_string(status))
            self._open_run = None

    def _spec(self, trial, run_id: str, fit_kwargs: dict) -> dict:
        """What pipeline.trial needs to train this trial (see trial.run)."""
        values, hypermodel = trial.hyperparameters.values, self.hypermodel
        epochs, initial_epoch, load_weights = fit_kwargs.get("epochs", hypermodel.epochs), 0, None
        if "tuner/epochs" in values:  # Hyperband: a promoted trial continues its predecessor
            epochs, initial_epoch = values["tuner/epochs"], values["tuner/initial_epoch"]
            if "tuner/trial_id" in values:
                load_weights = self._get_checkpoint_fname(values["tuner/trial_id"])
        # A trial that trains the first epochs of a longer schedule leaves its state for train.
        state_dir = None
        if hypermodel.epochs > epochs and "tuner/epochs" not in values:
            state_dir = self.state_dir(trial.trial_id)
            shutil.rmtree(state_dir, ignore_errors=True)  # a retried trial's old state
        return {
            "arrays": str(self._arrays_path()),
            "hyperparameters": values,
            "schedule_epochs": hypermodel.epochs,
            "epochs": epochs,
            "initial_epoch": initial_epoch,
            "augment": hypermodel.augment,
            "seed": hypermodel.seed,
            "precision": hypermodel.precision,
            "run_id": run_id,
            "load_weights": load_weights,
            "checkpoint": self._get_checkpoint_fname(trial.trial_id) if self.keep_checkpoints else None,
            "state_dir": str(state_dir) if state_dir else None,
        }

    def _arrays_path(self) -> Path:
        return Path(self.project_dir) / ARRAYS_FILE.format(tuner_id=self.tuner_id)

    def _end_orphaned_runs(self) -> None:
        """End the runs a killed search left open: FINISHED for a trial Keras Tuner recorded
        as completed, KILLED for one it will run again."""
        client = mlflow.MlflowClient()
        parent = mlflow.get_run(self.parent_run_id) if self.parent_run_id else mlflow.active_run()
        if parent:
            tracking.end_dead_runs(parent.info.experiment_id)
        if self._is_worker():
            return  # the trials' states are the chief's; `work` ended this worker's open runs
        for trial_id, run_id in self.trial_runs.items():
            try:
                status = client.get_run(run_id).info.status
            except MlflowException:
                continue
            trial = self.oracle.trials.get(trial_id)
            if trial is not None and trial.status == "COMPLETED" and status != "FINISHED":
                client.set_terminated(run_id, "FINISHED")
                log.info(
                    "trial %s had completed before the search was killed: run %s FINISHED", trial_id, run_id
                )
            elif (trial is None or trial.status != "COMPLETED") and status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
                log.info("trial %s was interrupted: run %s KILLED; the trial runs again", trial_id, run_id)

    def get_state(self):
        return {**super().get_state(), "mlflow_runs": self.trial_runs}

    def set_state(self, state):
        super().set_state(state)
        self.trial_runs = dict(state.get("mlflow_runs", {}))


def recover_interrupted_trials(oracle: keras_tuner.Oracle) -> None:
    """Make a reloaded oracle's state whole after a kill at any moment.

    Keras Tuner writes a trial's trial.json and then oracle.json; a kill between the two
    leaves them disagreeing. A trial that trial.json says is running but oracle.json does
    not know, is queued to run again (Keras Tuner itself re-queues the trials oracle.json
    lists as ongoing). A trial that trial.json says completed, but that oracle.json still
    had running, is kept and not run again. A trial run again starts with no metrics.
    """
    running, completed = "RUNNING", "COMPLETED"
    queue = oracle._retry_queue
    for trial_id, found in oracle.trials.items():
        if found.status == running and trial_id not in queue:
            queue.append(trial_id)
            if trial_id not in oracle.start_order:
                oracle.start_order.append(trial_id)
            oracle._record_values(found)
        elif found.status == completed and trial_id in queue:
            queue.remove(trial_id)
            if trial_id not in oracle.end_order:
                oracle.end_order.append(trial_id)
    for trial_id in queue:
        oracle.trials[trial_id].metrics = type(oracle.trials[trial_id].metrics)()


def _save_json_atomically(path, obj):
    """Keras Tuner's utils.save_json, but a kill mid-write leaves the previous file intact."""
    text = json.dumps(obj)
    files.write_text(Path(path), text)
    return text


# Keras Tuner rewrites oracle.json, tuner0.json and trial.json in place (open "w", then write);
# a kill in between would leave an empty file and a search that cannot be resumed.
keras_tuner_utils.save_json = _save_json_atomically


class DefaultsFirst:
    """Mixed into a Keras Tuner oracle: a search's first trial tries the declared defaults.

    Those are the recipe `train` runs untuned (config.LEARNING_RATE, config.BATCH_SIZE),
    so the trial `train` takes from a search is never worse than it by the search's own
    measure. Keras Tuner's random and Bayesian oracles start with random values.
    """

    def populate_space(self, trial_id):
        if self.trials:
            return super().populate_space(trial_id)
        return {"status": keras_tuner.engine.trial.TrialStatus.RUNNING, "values": self.get_space().values}


class BayesianOracle(DefaultsFirst, keras_tuner.oracles.BayesianOptimizationOracle):
    pass


class RandomOracle(DefaultsFirst, keras_tuner.oracles.RandomSearchOracle):
    pass


class SearchTuner(MlflowTrials, keras_tuner.Tuner):
    """The tuner for an oracle made here (DEFAULTS_FIRST_ORACLES)."""


class GridTuner(MlflowTrials, keras_tuner.GridSearch):
    """Tries the default values (config.LEARNING_RATE, config.BATCH_SIZE) first, then walks
    a grid of 10 log-spaced learning rates by every batch size."""


class HyperbandTuner(MlflowTrials, keras_tuner.Hyperband):
    keep_checkpoints = True


TUNERS = {"grid": GridTuner, "hyperband": HyperbandTuner}
DEFAULTS_FIRST_ORACLES = {"bayesian": BayesianOracle, "random": RandomOracle}


def rss_mib() -> float:
    """The process's resident memory now (peak where /proc is missing), in MiB."""
    now = tracking.process_memory_mib("VmRSS")
    return tracking.peak_rss_mib() if now is None else now


def check_params(
    oracle: str, max_trials: int, epochs_per_trial: int, seed: int, train_epochs: int = config.TRAIN_EPOCHS
) -> None:
    """Raise PipelineError naming the parameter when a value is impossible."""
    if oracle not in config.ORACLES:
        raise PipelineError(f"oracle={oracle!r}: must be one of {', '.join(config.ORACLES)}")
    for name, value in (("max_trials", max_trials), ("epochs_per_trial", epochs_per_trial)):
        if value < 1:
            raise PipelineError(f"{name}={value}: must be a whole number >= 1")
    if seed < 0:
        raise PipelineError(f"seed={seed}: must be a whole number >= 0")
    if train_epochs and train_epochs <= epochs_per_trial:
        raise PipelineError(
            f"train_epochs={train_epochs}: must be more than epochs_per_trial ({epochs_per_trial}), "
            "or 0 for trials whose schedule ends with them"
        )


def schedule_epochs(oracle: str, epochs_per_trial: int, train_epochs: int) -> int:
    """The epochs a trial's learning-rate schedule spans: the training it is the start of,
    unless `train_epochs` is 0 or the oracle is hyperband (trials of several lengths)."""
    return train_epochs if train_epochs and oracle != "hyperband" else epochs_per_trial


def project_name(
    arrays: dict[str, np.ndarray],
    oracle: str,
    epochs_per_trial: int,
    seed: int,
    augment: bool,
    precision: str,
    project_key: str = "",
    schedule: int | None = None,
) -> str:
    """A short name for the search: the same data and parameters give the same name.

    It leaves out `max_trials` on purpose, so a search can be resumed with a larger
    budget. It covers the search space and the training recipe from config, so a
    changed default starts a new search instead of mixing incomparable trials.
    """
    digest = hashlib.sha256()
    for key in ("x_train", "y_train", "x_val", "y_val"):
        digest.update(f"{key}{arrays[key].shape}{arrays[key].dtype}".encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    search = {
        "version": KEY_VERSION,
        "data": digest.hexdigest(),
        "project_key": project_key,
        "oracle": oracle,
        "epochs_per_trial": epochs_per_trial,
        "seed": seed,
        "augment": augment,
        "precision": precision,
        "learning_rate_range": list(config.LEARNING_RATE_RANGE),
        "batch_sizes": list(config.BATCH_SIZES),
        "bayesian_initial_points": config.BAYESIAN_INITIAL_POINTS,
        "recipe": fitting.recipe(),
    }
    if schedule and schedule != epochs_per_trial:  # absent otherwise: a search keeps its old name
        search["schedule_epochs"] = schedule
    return f"{oracle}-{hashlib.sha256(json.dumps(search, sort_keys=True).encode()).hexdigest()[:12]}"


def make_tuner(
    oracle: str,
    hypermodel: keras_tuner.HyperModel,
    max_trials: int,
    epochs_per_trial: int,
    seed: int,
    directory: Path,
    project: str,
    overwrite: bool,
) -> keras_tuner.Tuner:
    """The tuner for `oracle`, reloading directory/project unless `overwrite`."""
    if oracle == "hyperband":
        budget = {
            "max_epochs": epochs_per_trial,
            "factor": config.HYPERBAND_FACTOR,
            "hyperband_iterations": 1,
        }
    elif oracle == "bayesian":
        budget = {"max_trials": max_trials, "num_initial_points": config.BAYESIAN_INITIAL_POINTS}
    else:
        budget = {"max_trials": max_trials}
    settings = {
        "objective": keras_tuner.Objective(OBJECTIVE, direction="max"),
        "seed": seed + 1,  # Keras Tuner replaces a seed of 0 with a random one
        **budget,
    }
    where = {"directory": str(directory), "project_name": project, "overwrite": overwrite}
    if oracle in DEFAULTS_FIRST_ORACLES:
        return SearchTuner(oracle=DEFAULTS_FIRST_ORACLES[oracle](**settings), hypermodel=hypermodel, **where)
    return TUNERS[oracle](hypermodel=hypermodel, **settings, **where)


def search(tuner: keras_tuner.Tuner, epochs: int) -> None:
    """Run the tuner's remaining trials; PipelineError when trial after trial fails."""
    try:
        tuner.search(epochs=epochs, callbacks=[], verbose=0)
    except RuntimeError as error:
        if "consecutive failures" not in str(error):
            raise
        lines = [line for line in str(error).splitlines() if line.strip()]
        raise PipelineError(
            f"tuning stopped: {lines[0]} The last one ended with: {lines[-1]} "
            "(each trial's MLflow run is marked FAILED)"
        ) from None


def trials_table(tuner: keras_tuner.Tuner, epochs_per_trial: int) -> pd.DataFrame:
    """One row per Keras Tuner trial, in trial order (TRIAL_COLUMNS)."""
    rows = []
    for trial in sorted(tuner.oracle.trials.values(), key=lambda trial: int(trial.trial_id)):
        values = trial.hyperparameters.values
        score = trial.score if trial.status == "COMPLETED" else None
        rows.append(
            (
                trial.trial_id,
                trial.status,
                values.get("learning_rate"),
                values.get("batch_size"),
                values.get("tuner/epochs", epochs_per_trial),
                score,
                tuner.trial_runs.get(trial.trial_id, ""),
            )
        )
    return pd.DataFrame(rows, columns=TRIAL_COLUMNS)


def best_row(trials: pd.DataFrame) -> pd.Series:
    """The finished trial with the highest score (the first one on a tie)."""
    done = trials[trials[OBJECTIVE].notna() & np.isfinite(trials[OBJECTIVE].astype(float))]
    if done.empty:
        raise PipelineError("no trial finished with a validation accuracy; see the trials' MLflow runs")
    return done.loc[done[OBJECTIVE].astype(float).idxmax()]


def plot_trials(trials: pd.DataFrame, best: pd.Series, path: Path) -> None:
    """Score against learning rate (log axis), one marker and colour per batch size."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.subplots()
    done = trials[trials[OBJECTIVE].notna()]
    markers = "osD^v<>p"
    for batch_size, group in done.groupby("batch_size"):
        index = config.BATCH_SIZES.index(batch_size) if batch_size in config.BATCH_SIZES else 0
        axes.scatter(
            group["learning_rate"],
            group[OBJECTIVE].astype(float),
            marker=markers[index % len(markers)],
            color=f"C{index}",
            s=50,
            label=f"batch {batch_size}",
        )
    axes.scatter(
        [best["learning_rate"]],
        [float(best[OBJECTIVE])],
        s=260,
        facecolors="none",
        edgecolors="crimson",
        linewidths=2,
        label=f"best (trial {best['trial_id']})",
    )
    axes.set_xscale("log")
    axes.set_xlim(config.LEARNING_RATE_RANGE[0] / 1.3, config.LEARNING_RATE_RANGE[1] * 1.3)
    axes.set_xlabel("learning rate")
    axes.set_ylabel(f"best {OBJECTIVE}")
    axes.set_title(f"{len(done)} of {len(trials)} trials finished")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.savefig(path, dpi=120)


@contextlib.contextmanager
def open_search(
    arrays: dict[str, np.ndarray],
    oracle: str,
    max_trials: int,
    epochs_per_trial: int,
    seed: int,
    augment: bool,
    precision: str,
    resume: bool,
    project_key: str,
    train_epochs: int = config.TRAIN_EPOCHS,
) -> Iterator[keras_tuner.Tuner]:
    """The tuner of this search (`project_name`), its state reloaded when `resume`, else wiped,
    held under a lock for this Keras Tuner id (one process per id runs the search).

    Raises PipelineError for impossible parameters and for a state that does not reload.
    """
    check_params(oracle, max_trials, epochs_per_trial, seed, train_epochs)
    precision = fitting.set_precision(precision)
    keras.utils.set_random_seed(seed)
    schedule = schedule_epochs(oracle, epochs_per_trial, train_epochs)
    hypermodel = ResNetHyperModel(arrays, schedule, augment, seed, precision)
    project = project_name(arrays, oracle, epochs_per_trial, seed, augment, precision, project_key, schedule)
    if mlflow.active_run():
        mlflow.set_tag(PROJECT_TAG, project)
    resuming = resume and (config.tuner_dir() / project).exists()
    tuner_id = os.environ.get(cluster.TUNER_ID_ENV, "tuner0")
    with files.locked(config.tuner_dir() / f"{project}.{tuner_id}.lock", f"the search {project}"):
        try:
            tuner = make_tuner(
                oracle,
                hypermodel,
                max_trials,
                epochs_per_trial,
                seed,
                config.tuner_dir(),
                project,
                not resume,
            )
        except (RuntimeError, ValueError) as error:  # a foreign or damaged oracle.json / tuner0.json
            if not resuming:
                raise
            raise PipelineError(
                f"cannot resume the search in {config.tuner_dir() / project} ({error}); "
                "run with resume=false to start it over"
            ) from None
        yield tuner


def run(
    arrays: dict[str, np.ndarray],
    out_dir: Path,
    oracle: str = config.ORACLE,
    max_trials: int = config.MAX_TRIALS,
    epochs_per_trial: int = config.EPOCHS_PER_TRIAL,
    seed: int = config.SEED,
    augment: bool = config.AUGMENT,
    precision: str = config.PRECISION,
    resume: bool = True,
    project_key: str = "",
    train_epochs: int = config.TRAIN_EPOCHS,
) -> dict:
    """Search learning rate and batch size on `arrays`; write the results to `out_dir`.

    Each trial is logged as a nested MLflow run of the active run (a top-level run when
    none is active). With `resume`, a search with the same parameters (`project_name`)
    continues: finished trials are kept and not run again; without it the old state
    is wiped. `project_key` names the data (main passes the onehot run id).

    With `train_epochs` (not hyperband), every trial trains the first `epochs_per_trial`
    epochs of a `train_epochs`-epoch training, its learning-rate schedule included, and
    the best one's state is left in out_dir/config.BEST_TRIAL_DIR for train to continue
    (with TRAINING_KEY_FILE, the fitting.training_key it is the start of).

    Returns best_params ({"learning_rate", "batch_size"}), best_val_accuracy, trials
    (TRIAL_COLUMNS), new_trials, project_dir and best_state (the folder, or None).
    Raises PipelineError for impossible parameters and when no trial finishes.
    """
    with open_search(
        arrays,
        oracle,
        max_trials,
        epochs_per_trial,
        seed,
        augment,
        precision,
        resume,
        project_key,
        train_epochs,
    ) as tuner:
        known = sum(trial.status == "COMPLETED" for trial in tuner.oracle.trials.values())
        log.info(
            "%s search in %s: %d trials completed so far, %s",
            oracle,
            tuner.project_dir,
            known,
            "hyperband brackets decide the rest" if oracle == "hyperband" else f"up to {max_trials}",
        )
        # Search
        search(tuner, epochs_per_trial)
        parent = mlflow.active_run()
        if cluster.tuner_role() == cluster.CHIEF and parent:  # the workers know the trials' runs
            tuner.trial_runs.update(trial_runs_under(parent.info.run_id))
            tuner.save()
        state = tuner.keep_best_state()
    # Summarise
    trials = trials_table(tuner, epochs_per_trial)
    best = best_row(trials)
    best_params = {"learning_rate": float(best["learning_rate"]), "batch_size": int(best["batch_size"])}
    out_dir.mkdir(parents=True, exist_ok=True)
    best_state = None
    if state is not None and state == tuner.state_dir(best["trial_id"]):
        best_state = out_dir / config.BEST_TRIAL_DIR
        shutil.move(state, best_state)
        key = fitting.training_key(
            project_key, **best_params, epochs=train_epochs, seed=seed, augment=augment, precision=precision
        )
        key["trial_run_id"] = best["run_id"]
        (best_state / config.TRAINING_KEY_FILE).write_text(json.dumps(key, indent=1) + "\n")
    (out_dir / config.BEST_PARAMS_FILE).write_text(json.dumps(best_params, indent=1) + "\n")
    trials.to_csv(out_dir / config.TRIALS_FILE, index=False)
    plot_trials(trials, best, out_dir / config.TRIALS_PLOT_FILE)
    return {
        "best_params": best_params,
        f"best_{OBJECTIVE}": float(best[OBJECTIVE]),
        "trials": trials,
        "new_trials": sum(trial.status == "COMPLETED" for trial in tuner.oracle.trials.values()) - known,
        "project_dir": Path(tuner.project_dir),
        "best_state": best_state,
    }


def trial_runs_under(parent_run_id: str) -> dict[str, str]:
    """Trial id -> run id of the trial runs under a search run; a retried trial's last run."""
    runs = mlflow.search_runs(
        experiment_ids=[mlflow.get_run(parent_run_id).info.experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status != 'KILLED' "
            f"and tags.`{config.STAGE_TAG}` = '{TRIAL_STAGE}'"
        ),
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )
    return {run.data.tags[TRIAL_ID_TAG]: run.info.run_id for run in runs}


def work(
    arrays: dict[str, np.ndarray],
    parent_run_id: str,
    oracle: str = config.ORACLE,
    max_trials: int = config.MAX_TRIALS,
    epochs_per_trial: int = config.EPOCHS_PER_TRIAL,
    seed: int = config.SEED,
    augment: bool = config.AUGMENT,
    precision: str = config.PRECISION,
    project_key: str = "",
    train_epochs: int = config.TRAIN_EPOCHS,
) -> list[str]:
    """As a Keras Tuner worker, run the chief's trials until it has none left; returns their ids.

    The KERASTUNER_* variables name this worker and the chief; the parameters must be
    the chief's, so that both open the same search. Each trial is a child run of
    `parent_run_id`. A worker never wipes the search state (the chief does, without
    resume). A trial run that an earlier process with this worker's id left RUNNING
    is ended as KILLED first: that process died mid-trial, and the chief hands its
    trial to this one.
    """
    with open_search(
        arrays,
        oracle,
        max_trials,
        epochs_per_trial,
        seed,
        augment,
        precision,
        True,
        project_key,
        train_epochs,
    ) as tuner:
        tuner.parent_run_id = parent_run_id
        cluster.end_running_children(parent_run_id, {TUNER_ID_TAG: tuner.tuner_id}, RunStatus.KILLED)
        before = dict(tuner.trial_runs)
        search(tuner, epochs_per_trial)
    return sorted(trial for trial, run_id in tuner.trial_runs.items() if before.get(trial) != run_id)


def search_run(run_id: str) -> Run:
    """The RUNNING tune run that a worker's trials nest under; PipelineError otherwise."""
    if not run_id:
        raise PipelineError(
            f"a Keras Tuner worker ({cluster.TUNER_ID_ENV}={os.environ.get(cluster.TUNER_ID_ENV)}) needs "
            "--parent-run-id: the run id of the chief's tune run"
        )
    try:
        run = mlflow.get_run(run_id)
    except MlflowException:
        raise PipelineError(f"--parent-run-id {run_id!r} does not exist in {config.tracking_uri()}") from None
    if run.data.tags.get(config.STAGE_TAG) != "tune" or run.info.status != "RUNNING":
        raise PipelineError(
            f"--parent-run-id {run_id} is a {run.info.status} {run.data.tags.get(config.STAGE_TAG)} run, "
            "not the RUNNING tune run of a search"
        )
    return run


def parse_args(argv: list[str] | None):
    parser = cli.parser("tune", __doc__.splitlines()[0])
    parser.add_argument("--onehot-run-id", default="", help="onehot run to tune on (default: the latest)")
    parser.add_argument("--oracle", choices=config.ORACLES, default=config.ORACLE)
    parser.add_argument(
        "--max-trials", type=cli.positive_int, default=config.MAX_TRIALS, help="ignored by hyperband"
    )
    parser.add_argument(
        "--epochs-per-trial",
        type=cli.positive_int,
        default=config.EPOCHS_PER_TRIAL,
        help="hyperband: the most epochs one model trains",
    )
    parser.add_argument(
        "--train-epochs",
        type=cli.non_negative_int,
        default=config.TRAIN_EPOCHS,
        help="the training each trial is the start of: its learning-rate schedule spans this many "
        "epochs, and train --tune-run-id continues the best trial; 0 (default): each trial's "
        "schedule ends with it (hyperband: always)",
    )
    parser.add_argument("--seed", type=cli.seed, default=config.SEED)
    parser.add_argument("--augment", type=cli.boolean, default=config.AUGMENT)
    parser.add_argument("--precision", choices=config.PRECISIONS, default=config.PRECISION)
    parser.add_argument(
        "--resume", type=cli.boolean, default=True, help="continue a search with the same parameters"
    )
    parser.add_argument(
        "--workers",
        type=cli.non_negative_int,
        default=config.TUNE_WORKERS,
        help="Keras Tuner workers to start beside a chief on this machine (0: search in this process)",
    )
    parser.add_argument(
        "--parent-run-id",
        default="",
        help="a Keras Tuner worker only: the chief's tune run, which the worker's trial runs nest under",
    )
    return parser.parse_args(argv)


def log_to_mlflow(result: dict, out_dir: Path) -> None:
    """Best hyperparameters as params, the best score as a metric, the files as artifacts."""
    mlflow.log_params({f"best_{name}": value for name, value in result["best_params"].items()})
    finished = int((result["trials"]["status"] == "COMPLETED").sum())
    mlflow.log_metrics(
        {
            f"best_{OBJECTIVE}": result[f"best_{OBJECTIVE}"],
            "num_trials": finished,
            "num_new_trials": result["new_trials"],
        }
    )
    mlflow.log_artifacts(str(out_dir), artifact_path=config.TUNE_ARTIFACT)


def launch(args) -> None:
    """--workers N: the search as a Keras Tuner chief and N workers on loopback, in one tune run."""
    with tracking.stage_run("tune", vars(args)) as active, tempfile.TemporaryDirectory() as tmp:
        upstream = tracking.find_run("onehot", args.onehot_run_id)
        options = {**vars(args), "onehot_run_id": upstream.info.run_id}
        try:
            restarts = cluster.search(options, args.workers, active, Path(tmp))
        finally:
            mlflow.log_artifacts(tmp, artifact_path=config.CLUSTER_LOGS_ARTIFACT)
        mlflow.log_metric("worker_restarts", restarts)


def run_worker(args) -> None:
    """This process is a Keras Tuner worker: no stage run of its own, trials under --parent-run-id."""
    tracking.configure()
    parent = search_run(args.parent_run_id)
    mlflow.set_experiment(experiment_id=parent.info.experiment_id)
    upstream = tracking.find_run("onehot", args.onehot_run_id)
    options = {key: value for key, value in vars(args).items() if key not in (*NOT_SEARCH_OPTIONS, "resume")}
    done = work(data.load(upstream), parent.info.run_id, project_key=upstream.info.run_id, **options)
    log.info("worker %s ran trials %s; the chief has no more", os.environ[cluster.TUNER_ID_ENV], done)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_params(args.oracle, args.max_trials, args.epochs_per_trial, args.seed, args.train_epochs)
    role = cluster.tuner_role()
    if role not in (None, cluster.CHIEF):
        return run_worker(args)
    tracking.check_upstream(onehot_run_id=args.onehot_run_id)
    if role is None and args.workers:
        return launch(args)
    with tracking.stage_run("tune", vars(args)) as active, tempfile.TemporaryDirectory() as tmp:
        upstream = tracking.find_run("onehot", args.onehot_run_id)
        mlflow.set_tag(config.ONEHOT_RUN_TAG, upstream.info.run_id)
        if role == cluster.CHIEF:
            log.info(
                "Keras Tuner chief of tune run %s: start workers with --onehot-run-id %s --parent-run-id %s",
                active.info.run_id,
                upstream.info.run_id,
                active.info.run_id,
            )
        arrays = data.load(upstream)
        out_dir = Path(tmp) / config.TUNE_ARTIFACT
        options = {key: value for key, value in vars(args).items() if key not in NOT_SEARCH_OPTIONS}
        result = run(arrays, out_dir, project_key=upstream.info.run_id, **options)
        mlflow.set_tag(PROJECT_TAG, result["project_dir"].name)
        log_to_mlflow(result, out_dir)
        log.info(
            "best of %d trials: %s (%s %.4f); %d new",
            len(result["trials"]),
            result["best_params"],
            OBJECTIVE,
            result[f"best_{OBJECTIVE}"],
            result["new_trials"],
        )


if __name__ == "__main__":
    cli.run(main)
