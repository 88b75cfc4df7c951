"""Main: the whole pipeline, each stage a child run of one parent run.

A finished step is reused when its entry point, its parameters (compared as
typed values) and the code version (a clean git commit) match; a failed step
stops the chain with its error, and running main again continues from there.
"""

import argparse
import logging

import mlflow

from pipeline import cli, config, ingest, sources, tracking, train
from pipeline.steps import step

log = logging.getLogger("pipeline.main")


def run(args: argparse.Namespace) -> dict[str, str]:
    """Run (or reuse) every stage under the active run; return each stage's run id."""
    runs = {}
    ingest_options = vars(ingest.parse_args([]))
    runs["ingest"] = step("ingest", {key: getattr(args, key) for key in ingest_options}, args.env_manager)
    runs["onehot"] = step("onehot", {"ingest_run_id": runs["ingest"]}, args.env_manager)
    runs["build"] = step("build", {"image_size": args.image_size}, args.env_manager)
    hyper = {"learning_rate": args.learning_rate, "batch_size": args.batch_size, "tune_run_id": ""}
    if args.max_trials:
        runs["tune"] = step(
            "tune",
            {
                "onehot_run_id": runs["onehot"],
                "oracle": args.oracle,
                "max_trials": args.max_trials,
                "epochs_per_trial": args.epochs_per_trial,
                "seed": args.seed,
                "augment": args.augment,
                "precision": args.precision,
            },
            args.env_manager,
        )
        hyper = {**train.tuned_hyperparameters(runs["tune"]), "tune_run_id": runs["tune"]}
    runs["train"] = step(
        "train",
        {
            "onehot_run_id": runs["onehot"],
            **hyper,
            "epochs": args.epochs,
            "patience": args.patience,
            "min_epochs": args.min_epochs,
            "augment": args.augment,
            "seed": args.seed,
            "precision": args.precision,
            "model_name": args.model_name,
            "test_time_augmentation": args.test_time_augmentation,
        },
        args.env_manager,
    )
    version = mlflow.get_run(runs["train"]).data.tags[config.MODEL_VERSION_TAG]
    # Never reused: whether it promotes depends on the champion at the time, not on its parameters.
    runs["evaluate"] = step(
        "evaluate",
        {
            "model_uri": f"models:/{args.model_name}/{version}",
            "model_name": args.model_name,
            "ingest_run_id": runs["ingest"],
            "min_accuracy": args.min_accuracy,
        },
        args.env_manager,
        reuse=False,
    )
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser("main", __doc__.splitlines()[0])
    ingest.add_options(parser)
    parser.add_argument("--oracle", choices=config.ORACLES, default=config.ORACLE)
    parser.add_argument(
        "--max-trials", type=cli.non_negative_int, default=config.MAX_TRIALS, help="0 skips the search"
    )
    parser.add_argument("--epochs-per-trial", type=cli.positive_int, default=config.EPOCHS_PER_TRIAL)
    train.add_options(parser)
    parser.add_argument("--min-accuracy", type=cli.unit_interval, default=config.MIN_ACCURACY)
    parser.add_argument(
        "--env-manager",
        default="local",
        choices=("local", "uv", "virtualenv", "conda"),
        help="environment manager for the steps; local reuses the environment main runs in",
    )
    return parser.parse_args(argv)


def check_params(args: argparse.Namespace) -> None:
    """Every step's checks of the options main passes through, before the first step starts.

    Raises PipelineError naming the parameter and its allowed range.
    """
    ingest.check_params(args.image_size, args.val_fraction, args.test_fraction, args.max_per_class)
    sources.check(args.source, args.sha256)
    train.check_params(args.learning_rate, args.batch_size, args.epochs, args.patience, args.min_epochs)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_params(args)
    with tracking.stage_run("main", vars(args)):
        runs = run(args)
        log.info("pipeline finished: %s", ", ".join(f"{stage} {run_id}" for stage, run_id in runs.items()))


if __name__ == "__main__":
    cli.run(main)
