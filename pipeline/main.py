"""Main: the whole pipeline, each stage a child run of one parent run.

A finished step is reused when its entry point, its parameters (compared as
typed values) and the code version (a clean git commit) match; a failed step
stops the chain with its error, and running main again continues from there.
"""

import argparse
import logging
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import ExecutionException

from pipeline import build, cli, config, ingest, onehot, tracking
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.main")

PROJECT_DIR = Path(__file__).resolve().parents[1]
STAGES = {"ingest": ingest, "onehot": onehot, "build": build}
ENTRY_POINT_TAG = "mlflow.project.entryPoint"


def run(args: argparse.Namespace, env_manager: str = "local") -> dict[str, str]:
    """Run (or reuse) every stage under the active run; return each stage's run id."""
    ingest_options = vars(ingest.parse_args([]))
    ingest_run = step("ingest", {key: getattr(args, key) for key in ingest_options}, env_manager)
    onehot_run = step("onehot", {"ingest_run_id": ingest_run, "num_classes": config.NUM_CLASSES}, env_manager)
    build_run = step("build", {"image_size": args.image_size, "num_classes": config.NUM_CLASSES}, env_manager)
    return {"ingest": ingest_run, "onehot": onehot_run, "build": build_run}


def step(stage: str, parameters: dict, env_manager: str) -> str:
    """The run id of a finished `stage` run with these parameters, running it if needed."""
    experiment_id = mlflow.active_run().info.experiment_id
    reusable = find_reusable(stage, parameters, experiment_id)
    if reusable is not None:
        log.info("reusing finished %s run %s", stage, reusable.info.run_id)
        mlflow.set_tag(f"pipeline.{stage}_run_id", reusable.info.run_id)
        return reusable.info.run_id
    log.info("running %s with %s", stage, parameters)
    try:
        submitted = mlflow.projects.run(
            str(PROJECT_DIR),
            entry_point=stage,
            parameters={key: str(value) for key, value in parameters.items()},
            env_manager=env_manager,
            experiment_id=experiment_id,
            synchronous=True,
        )
    except ExecutionException as error:
        raise PipelineError(
            f"step {stage} failed ({error}); its log is above. Fix the cause and run main again: "
            "finished steps are reused"
        ) from None
    mlflow.set_tag(f"pipeline.{stage}_run_id", submitted.run_id)
    return submitted.run_id


def find_reusable(
    stage: str, parameters: dict, experiment_id: str, version: dict[str, str] | None = None
) -> Run | None:
    """A finished run of `stage` from the same clean commit with equal typed parameters."""
    version = version or tracking.code_version()
    if version[config.DIRTY_TAG] != "false":
        return None
    candidates = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=(
            f"tags.`{ENTRY_POINT_TAG}` = '{stage}' and attributes.status = 'FINISHED' "
            f"and tags.`{config.COMMIT_TAG}` = '{version[config.COMMIT_TAG]}' "
            f"and tags.`{config.DIRTY_TAG}` = 'false'"
        ),
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    wanted = typed(stage, parameters)
    return next((run for run in candidates if typed(stage, run.data.params) == wanted), None)


def typed(stage: str, parameters: dict) -> argparse.Namespace | None:
    """Parameters parsed by the stage's own command line, so "0.15" equals ".15"."""
    argv = [f"--{key.replace('_', '-')}={value}" for key, value in parameters.items()]
    try:
        return STAGES[stage].parse_args(argv)
    except SystemExit:
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.parser("main", __doc__.splitlines()[0])
    ingest.add_options(parser)
    parser.add_argument(
        "--env-manager",
        default="local",
        choices=("local", "uv", "virtualenv", "conda"),
        help="environment manager for the steps; local reuses the environment main runs in",
    )
    return parser.parse_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ingest.check_params(args.image_size, args.val_fraction, args.test_fraction)
    with tracking.stage_run("main", vars(args)):
        runs = run(args, args.env_manager)
        log.info("pipeline finished: %s", ", ".join(f"{stage} {run_id}" for stage, run_id in runs.items()))


if __name__ == "__main__":
    main()
