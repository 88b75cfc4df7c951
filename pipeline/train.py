"""Train: the ResNet50 from scratch on a onehot run's data, logged and registered as a pyfunc.

`mlflow run . -e train` with no parameters trains with the defaults on the latest
onehot run (running ingest and onehot first when there is none).

The training state is backed up under config.checkpoint_dir() about once a minute
(config.BACKUP_INTERVAL_S) and after the last epoch, in a folder named by the data, the
settings and the code version (`checkpoint_folder`).
With `--tune-run-id`, training continues the search's best trial when that trial trained
the first epochs of this very training (see `continue_trial`).
Running the same training again after a kill continues from the last backed-up epoch,
in the same MLflow run when it is started with `python -m pipeline.train` (under
`mlflow run`, in the run MLflow hands over; `main` hands over the unfinished one).
The folder is removed once the run has finished.
"""

import contextlib
import gc
import hashlib
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from PIL import Image

from pipeline import cli, config, files, tracking
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.train")

BACKUP_KEY_VERSION = 1  # bump when a change to training makes old backups unusable
# Options of main that are not run()'s.
NOT_TRAINING_OPTIONS = (
    "onehot_run_id",
    "tune_run_id",
    "model_name",
    "strategy",
    "workers",
    "test_time_augmentation",  # how the model is served, not how it trains
)


def run(
    arrays: dict[str, np.ndarray],
    out_dir: Path,
    run_id: str,
    learning_rate: float = config.LEARNING_RATE,
    batch_size: int = config.BATCH_SIZE,
    epochs: int = config.EPOCHS,
    patience: int = config.PATIENCE,
    min_epochs: int = config.MIN_EPOCHS,
    augment: bool = config.AUGMENT,
    seed: int = config.SEED,
    precision: str = config.PRECISION,
    backup_dir: Path | None = None,
    strategy=None,
):
    """Train a fresh ResNet50 on `arrays` (from data.load), logging each epoch to `run_id`.

    Stops early on validation accuracy (never before `min_epochs`) with the best
    weights restored. A run that trains all `epochs` ends instead with the mean of the
    weights of its last config.SWA_EPOCHS epochs, batch-norm statistics recomputed on the
    training images. Writes the history and learning curves to `out_dir`; returns the
    model, the history table (one row per epoch, every epoch since the first) whose `kept`
    column marks the epochs whose weights the model has, and a dict of what was kept
    (`val_accuracy`, the last kept `epoch` counted from 1, `averaged_epochs`).

    With `backup_dir`, the training state is saved there (see fitting.Backup), and a
    backup found there is continued: its epochs are not trained again, early stopping
    decides as if uninterrupted, and epochs the run lacks are logged to `run_id` from
    the backup. The folder stays until the caller removes it. Raises PipelineError when
    another process trains from the same folder.

    `strategy` (a tf.distribute strategy, default: none) holds the model's variables;
    `batch_size` is the global batch, split between its replicas. With `run_id` None
    nothing is logged (a multi-worker training's non-chief worker).
    """
    import keras

    from pipeline import data, fitting

    check_params(learning_rate, batch_size, epochs, patience, min_epochs)
    keras.utils.set_random_seed(seed)
    policy = fitting.set_precision(precision)
    x_train, y_train = arrays["x_train"], arrays["y_train"]
    with (strategy or fitting.distribution_strategy()).scope():
        model = fitting.new_model(x_train.shape[1], y_train.shape[1])
        fitting.compile_model(model, learning_rate, fitting.steps(len(x_train), batch_size), epochs)
    # Not under a strategy: each worker would average and re-estimate on its own.
    average = fitting.WeightAverage(epochs) if config.SWA_EPOCHS and strategy is None else None
    # A run that trains every epoch keeps the average: a stopper that cannot stop earlier would only
    # hold a copy of the best weights that nothing reads (94 MB more at train's memory peak).
    stopper = None
    if average is None or fitting.can_stop_early(epochs, patience, min_epochs):
        stopper = fitting.early_stopping(patience, min_epochs)
    lock = contextlib.nullcontext()
    if backup_dir:
        lock = files.locked(Path(f"{backup_dir}.lock"), f"the training backup {backup_dir}")
    with lock:
        backup = fitting.Backup(backup_dir, stopper, run_id, average) if backup_dir else None
        logger = fitting.EpochLogger(run_id, len(x_train), backup=backup)
        initial_epoch = backup.initial_epoch(epochs) if backup else 0
        if initial_epoch:
            logged = logger.log_missing()
            log.info("%d epochs done before; %d of them logged now from the backup", initial_epoch, logged)
        log.info(
            "training %d images for up to %d epochs (%s, batch %d)", len(x_train), epochs, policy, batch_size
        )
        validation = data.dataset(arrays["x_val"], arrays["y_val"], max(batch_size, 128))
        steps_per_epoch = fitting.steps(len(x_train), batch_size)
        # A continued run draws the done epochs' batches again, so that its shuffling and
        # augmentation go on where the killed run's stopped: the same model as uninterrupted.
        training = data.dataset(
            x_train,
            y_train,
            batch_size,
            training=True,
            augment=augment,
            seed=seed,
            endless=True,
            skip=initial_epoch * steps_per_epoch,
        )
        # The logger has the backup save the stopper's state and the average, so it comes after them.
        callbacks = [callback for callback in (stopper, average, logger, backup) if callback is not None]
        model.fit(
            training,
            steps_per_epoch=steps_per_epoch,
            validation_data=validation,  # finite: see data.dataset
            epochs=epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            shuffle=False,  # the dataset shuffles itself
            verbose=0,
        )
    table = pd.DataFrame(logger.rows).drop(columns="timestamp")
    if average is not None and average.complete:
        model.set_weights(average.mean)
        fitting.reestimate_batch_norm(model, x_train, batch_size, seed)
        table["kept"] = table["epoch"] >= average.first
        averaged = average.count
        val_accuracy = float(model.evaluate(validation, verbose=0, return_dict=True)["accuracy"])
        log.info("averaged the weights of the last %d epochs: val_accuracy %.4f", average.count, val_accuracy)
    else:
        best = stopper is not None and stopper.best_weights is not None
        kept = stopper.best_epoch if best else int(table["epoch"].iloc[-1])
        table["kept"] = table["epoch"] == kept
        averaged = 0
        val_accuracy = float(table.loc[table["kept"], "val_accuracy"].iloc[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / config.HISTORY_FILE, index=False)
    plot_curves(table, out_dir / config.CURVES_FILE)
    last_kept = int(table.loc[table["kept"], "epoch"].iloc[-1])
    return model, table, {"val_accuracy": val_accuracy, "epoch": last_kept + 1, "averaged_epochs": averaged}


def check_params(learning_rate, batch_size, epochs, patience, min_epochs) -> None:
    """Raise PipelineError naming the parameter when a value is impossible."""
    if not 0 < learning_rate < 1:
        raise PipelineError(f"learning_rate={learning_rate}: must lie strictly between 0 and 1")
    for name, value in (("batch_size", batch_size), ("epochs", epochs)):
        if value < 1:
            raise PipelineError(f"{name}={value}: must be at least 1")
    for name, value in (("patience", patience), ("min_epochs", min_epochs)):
        if value < 0:
            raise PipelineError(f"{name}={value}: must be 0 or more")


def plot_curves(history: pd.DataFrame, path: Path) -> None:
    """Loss and accuracy per epoch, training against validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = history["epoch"] + 1
    for axis, metric in zip(axes, ("loss", "accuracy")):
        axis.plot(epochs, history[metric], label="training")
        axis.plot(epochs, history[f"val_{metric}"], label="validation")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def tuned_hyperparameters(tune_run_id: str) -> dict:
    """The best learning rate and batch size of a finished tune run."""
    tune_run = tracking.find_run("tune", tune_run_id)
    path = tracking.download(tune_run, f"{config.TUNE_ARTIFACT}/{config.BEST_PARAMS_FILE}")
    try:
        best = json.loads(path.read_text())
        return {"learning_rate": float(best["learning_rate"]), "batch_size": int(best["batch_size"])}
    except (ValueError, KeyError, TypeError) as error:
        raise PipelineError(
            f"tune run {tune_run_id}: {config.BEST_PARAMS_FILE} is unreadable ({error})"
        ) from None


def continue_trial(tune_run_id: str, key: dict, min_epochs: int, backup_dir: Path, run_id: str) -> str | None:
    """Make the search's best trial the start of this training; returns the trial's run id, or
    None when training starts from the first epoch.

    A tune run with `train_epochs` leaves its best trial's state (fitting.Backup) with the
    fitting.training_key of the training it is the start of. When that key is `key`, and
    the trial ended before early stopping (`min_epochs`) would have had a say, the state
    becomes `backup_dir`'s backup for the run `run_id`: its epochs are logged to the run
    and not trained again. Otherwise nothing changes, and the log says why.
    """
    from pipeline import fitting

    tune_run = tracking.find_run("tune", tune_run_id)
    backup_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=backup_dir.parent) as tmp:
        try:
            folder = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=tune_run.info.run_id,
                    artifact_path=f"{config.TUNE_ARTIFACT}/{config.BEST_TRIAL_DIR}",
                    dst_path=tmp,
                )
            )
            trained = json.loads((folder / config.TRAINING_KEY_FILE).read_text())
        except (MlflowException, OSError, ValueError):
            log.info("tune run %s left no trial to continue: training from the first epoch", tune_run_id)
            return None
        state = fitting.Backup.read(folder)
        differences = sorted(name for name in key if trained.get(name) != key[name])
        if state is None:
            log.info("the search's best trial left no readable state: training from the first epoch")
            return None
        if differences:
            log.info(
                "the search's best trial started another training (%s differ): training from the first epoch",
                ", ".join(differences),
            )
            return None
        if state["epoch"] > min_epochs:
            log.info(
                "the search's best trial trained %d epochs, more than min_epochs (%d), where early "
                "stopping would have had a say: training from the first epoch",
                state["epoch"],
                min_epochs,
            )
            return None
        files.write_text(folder / fitting.Backup.STATE, json.dumps({**state, "run_id": run_id}, indent=1))
        (folder / config.TRAINING_KEY_FILE).unlink()
        shutil.rmtree(backup_dir, ignore_errors=True)
        folder.rename(backup_dir)
    log.info(
        "continuing the search's best trial (run %s): its %d epochs are this training's first",
        trained.get("trial_run_id"),
        state["epoch"],
    )
    return trained.get("trial_run_id", "")


def finished_onehot(onehot_run_id: str) -> Run | None:
    """The onehot run to train on: the one named, else the latest; None when there is none yet."""
    if onehot_run_id:
        return tracking.find_run("onehot", onehot_run_id)
    try:
        return tracking.find_run("onehot", "")
    except PipelineError:
        return None


def run_ingest_and_onehot() -> Run:
    """Run ingest (unless one finished) and onehot as child runs of the active run."""
    from pipeline.steps import step

    log.info("no finished onehot run yet: running ingest and onehot first")
    try:
        ingest_run = tracking.find_run("ingest", "").info.run_id
    except PipelineError:
        ingest_run = step("ingest", {}, "local")
    return tracking.find_run("onehot", step("onehot", {"ingest_run_id": ingest_run}, "local"))


def checkpoint_folder(onehot_run_id: str, options: dict) -> Path:
    """Where a training's backup lives: one folder per data, training options and code version.

    `options` are run's keyword arguments (learning_rate, batch_size, epochs, ...).
    The training recipe from config is part of the name, so a changed default never
    continues an incompatible backup.
    """
    from pipeline import fitting

    key = {
        "version": BACKUP_KEY_VERSION,
        "onehot_run_id": onehot_run_id,
        "commit": tracking.code_version()[config.COMMIT_TAG],
        "options": options,
        "recipe": fitting.recipe(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return config.checkpoint_dir() / f"train-{digest[:12]}"


def unfinished_run(backup_dir: Path) -> str | None:
    """The run whose training the backup in `backup_dir` holds, when it is one to continue.

    That is a train run of the current experiment that did not finish (killed, failed,
    or left RUNNING by a process that is gone). A backup of a run that did finish is
    stale (killed after the end) and is removed. Raises PipelineError when the run's
    process is still training.
    """
    from pipeline import fitting

    state = fitting.Backup.read(backup_dir)
    if not state or not state.get("run_id"):
        return None
    try:
        run = mlflow.get_run(state["run_id"])
    except MlflowException:
        return None
    if run.info.status == "FINISHED":
        shutil.rmtree(backup_dir, ignore_errors=True)
        return None
    experiment = mlflow.get_experiment_by_name(config.experiment_name())
    if (
        run.data.tags.get(config.STAGE_TAG) != "train"
        or run.info.lifecycle_stage != "active"
        or experiment is None
        or run.info.experiment_id != experiment.experiment_id
    ):
        return None
    process = run.data.tags.get(config.PROCESS_TAG, "")
    if run.info.status == "RUNNING" and process and tracking.process_alive(process):
        raise PipelineError(
            f"train run {run.info.run_id} with these options is still running (process {process}); "
            "wait for it to end or stop it"
        )
    return run.info.run_id


def example_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def add_options(parser) -> None:
    """The training options (main passes the same ones through)."""
    parser.add_argument(
        "--learning-rate", type=cli.fraction, default=config.LEARNING_RATE, help="in (0, 1); unless tuned"
    )
    parser.add_argument("--batch-size", type=cli.positive_int, default=config.BATCH_SIZE, help="unless tuned")
    parser.add_argument("--epochs", type=cli.positive_int, default=config.EPOCHS)
    parser.add_argument("--patience", type=cli.non_negative_int, default=config.PATIENCE)
    parser.add_argument("--min-epochs", type=cli.non_negative_int, default=config.MIN_EPOCHS)
    parser.add_argument("--augment", type=cli.boolean, default=config.AUGMENT)
    parser.add_argument("--precision", choices=config.PRECISIONS, default=config.PRECISION)
    parser.add_argument(
        "--model-name", type=cli.model_name, default=config.MODEL_NAME, help="registered model name"
    )
    parser.add_argument(
        "--test-time-augmentation",
        choices=config.TEST_TIME_AUGMENTATION_CHOICES,
        default=config.TEST_TIME_AUGMENTATION,
        help="whether the logged model averages shifted copies of the photos it is unsure of: "
        "auto, when that lowers the validation loss",
    )


def parse_args(argv: list[str] | None):
    parser = cli.parser("train", __doc__.splitlines()[0])
    parser.add_argument("--onehot-run-id", default="", help="onehot run to train on (default: the latest)")
    parser.add_argument(
        "--tune-run-id", default="", help="take learning rate and batch size from this search"
    )
    add_options(parser)
    parser.add_argument(
        "--seed",
        type=cli.seed,
        default=config.SEED,
        help="initial weights, data order and augmentation: one seed repeats a training on one machine",
    )
    parser.add_argument(
        "--strategy",
        choices=config.STRATEGIES,
        default=config.STRATEGY,
        help="multiworker: tf.distribute.MultiWorkerMirroredStrategy over the workers that TF_CONFIG "
        "names, or, without TF_CONFIG, over --workers processes started on this machine",
    )
    parser.add_argument(
        "--workers",
        type=cli.positive_int,
        default=config.TRAIN_WORKERS,
        help="strategy=multiworker without TF_CONFIG: the processes to start on this machine",
    )
    return parser.parse_args(argv)


def launch(args) -> None:
    """strategy=multiworker without TF_CONFIG: `workers` processes on loopback, in one train run."""
    from pipeline import cluster

    with tracking.stage_run("train", vars(args)) as active, tempfile.TemporaryDirectory() as tmp:
        onehot_run = finished_onehot(args.onehot_run_id) or run_ingest_and_onehot()
        options = {**vars(args), "onehot_run_id": onehot_run.info.run_id}
        try:
            cluster.train(options, args.workers, active, Path(tmp))
        finally:
            mlflow.log_artifacts(tmp, artifact_path=config.CLUSTER_LOGS_ARTIFACT)


def train_as_worker(args, strategy) -> None:
    """A MultiWorkerMirroredStrategy worker other than the chief: it computes its share of
    every batch and logs nothing; the chief logs and registers the model."""
    from pipeline import data

    hyper = {"learning_rate": args.learning_rate, "batch_size": args.batch_size}
    if args.tune_run_id:
        hyper = tuned_hyperparameters(args.tune_run_id)
    arrays = data.load(tracking.find_run("onehot", args.onehot_run_id))
    options = {k: v for k, v in vars(args).items() if k not in NOT_TRAINING_OPTIONS}
    with tempfile.TemporaryDirectory() as tmp:
        run(arrays, Path(tmp), None, strategy=strategy, **{**options, **hyper})


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_params(args.learning_rate, args.batch_size, args.epochs, args.patience, args.min_epochs)
    config.backup_interval_s()  # a bad $SIGN_DIGITS_BACKUP_INTERVAL_S stops train before any run
    tracking.check_upstream(onehot_run_id=args.onehot_run_id, tune_run_id=args.tune_run_id)
    strategy = None
    if args.strategy == "multiworker":
        from pipeline import cluster, fitting

        if cluster.tf_config() is None:
            return launch(args)
        strategy = fitting.distribution_strategy(args.strategy)  # before TensorFlow runs anything
        if not cluster.is_chief():
            return train_as_worker(args, strategy)
    tracking.configure()
    hyper = {"learning_rate": args.learning_rate, "batch_size": args.batch_size}
    if args.tune_run_id:
        hyper = tuned_hyperparameters(args.tune_run_id)
        log.info("using the search's best hyperparameters %s", hyper)
    options = {k: v for k, v in vars(args).items() if k not in NOT_TRAINING_OPTIONS}
    options.update(hyper)
    onehot_run = finished_onehot(args.onehot_run_id)
    # Each multi-worker process would need a backup of its own: not built, so no backup there.
    backup_dir = checkpoint_folder(onehot_run.info.run_id, options) if onehot_run and not strategy else None
    resume = unfinished_run(backup_dir) if backup_dir else None
    if resume:
        log.info("continuing the unfinished train run %s from its backup in %s", resume, backup_dir)
    with (
        tracking.stage_run("train", vars(args), run_id=resume) as active,
        tempfile.TemporaryDirectory() as tmp,
    ):
        if args.tune_run_id:
            tracking.log_new_params(active, {f"tuned_{key}": value for key, value in hyper.items()})
        if onehot_run is None:
            onehot_run = run_ingest_and_onehot()
            backup_dir = None if strategy else checkpoint_folder(onehot_run.info.run_id, options)
        from pipeline import data, fitting, serving

        if args.tune_run_id and backup_dir and not resume and fitting.Backup.read(backup_dir) is None:
            training = ("learning_rate", "batch_size", "epochs", "seed", "augment", "precision")
            key = fitting.training_key(onehot_run.info.run_id, **{name: options[name] for name in training})
            trial = continue_trial(
                args.tune_run_id, key, options["min_epochs"], backup_dir, active.info.run_id
            )
            if trial is not None:
                mlflow.set_tag(config.STARTED_FROM_TAG, trial)

        arrays = data.load(onehot_run)
        out_dir = Path(tmp) / config.TRAIN_ARTIFACT
        model, history, kept = run(
            arrays, out_dir, active.info.run_id, backup_dir=backup_dir, strategy=strategy, **options
        )
        mlflow.log_metrics(
            {
                "kept_val_accuracy": kept["val_accuracy"],
                "kept_epoch": kept["epoch"],
                "averaged_epochs": kept["averaged_epochs"],
                "epochs_trained": len(history),
            }
        )
        mlflow.log_artifacts(str(out_dir), artifact_path=config.TRAIN_ARTIFACT)
        # Training is over: a float32 copy without the optimizer, so that Adam's moments (twice the
        # weights) and the traced training step are freed before the serving checks add OpenVINO's
        # memory (peak resident memory 135-160 MiB lower in a probe).
        model = serving.float32_copy(model)
        gc.collect()
        choice = serving.choose_bfloat16_stages(model, arrays["x_val"])
        stages = choice.stages
        mlflow.set_tag(config.SERVING_STAGES_TAG, ",".join(map(str, stages)) or "none")
        mlflow.log_metric("serving_validation_probability_gap", choice.gap)
        shift, scores = serving.choose_test_time_shift(
            choice.network, arrays["x_val"], arrays["y_val"], args.test_time_augmentation
        )
        del choice  # OpenVINO's copy of the network, before logging adds the saved model's memory
        gc.collect()
        mlflow.set_tag(config.SERVING_SHIFT_TAG, str(shift))
        mlflow.log_metrics(
            {
                "serving_validation_errors_single_view": scores.errors_single,
                "serving_validation_errors_shifted": scores.errors_shifted,
                "serving_validation_loss_single_view": scores.loss_single,
                "serving_validation_loss_shifted": scores.loss_shifted,
            }
        )
        log.info(
            "test-time augmentation %s: validation loss %.4f shifted, %.4f from the photo alone "
            "(%d and %d photos wrong)",
            f"on ({shift} pixels)" if shift else "off",
            scores.loss_shifted,
            scores.loss_single,
            scores.errors_shifted,
            scores.errors_single,
        )
        example = example_png(arrays["x_val"][0])
        info = serving.log_model(model, args.model_name, example, stages, test_time_shift=shift)
        mlflow.set_tags(
            {
                config.ONEHOT_RUN_TAG: onehot_run.info.run_id,
                config.INGEST_RUN_TAG: onehot_run.data.tags.get(config.INGEST_RUN_TAG, ""),
                config.MODEL_URI_TAG: info.model_uri,
                config.MODEL_VERSION_TAG: str(info.registered_model_version or ""),
            }
        )
        log.info(
            "kept %s (val_accuracy %.4f); registered %s version %s",
            f"the mean of {kept['averaged_epochs']} epochs to epoch {kept['epoch']}"
            if kept["averaged_epochs"]
            else f"epoch {kept['epoch']}",
            kept["val_accuracy"],
            args.model_name,
            info.registered_model_version,
        )
    if backup_dir:  # only now: a kill before the run ended FINISHED must find the backup
        shutil.rmtree(backup_dir, ignore_errors=True)


if __name__ == "__main__":
    cli.run(main)
