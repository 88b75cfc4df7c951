"""Run a stage as a child MLflow Project run, or reuse a finished one.

A finished run is reused when its entry point, its parameters (compared as
typed values) and the code version (a clean git commit) match. A stage that can
continue where it stopped (tune, train) is run again in its unfinished run with the
same parameters and commit, so that a killed search or training keeps one run.
"""

import argparse
import importlib
import logging
import shlex
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import ExecutionException

from pipeline import config, tracking
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]
ENTRY_POINT_TAG = "mlflow.project.entryPoint"
PARENT_TAG = "mlflow.parentRunId"
RESUMABLE = ("tune", "train")  # stages that continue from their own saved state


def step(stage: str, parameters: dict, env_manager: str, reuse: bool = True) -> str:
    """The run id of a finished `stage` run with these parameters, running it if needed."""
    experiment_id = mlflow.active_run().info.experiment_id
    reusable = find_reusable(stage, parameters, experiment_id) if reuse else None
    if reusable is not None:
        log.info("reusing finished %s run %s", stage, reusable.info.run_id)
        mlflow.set_tag(f"pipeline.{stage}_run_id", reusable.info.run_id)
        return reusable.info.run_id
    unfinished = find_unfinished(stage, parameters, experiment_id) if stage in RESUMABLE else None
    if unfinished is not None:
        log.info("continuing the unfinished %s run %s", stage, unfinished.info.run_id)
        mlflow.MlflowClient().set_tag(unfinished.info.run_id, PARENT_TAG, mlflow.active_run().info.run_id)
    else:
        log.info("running %s with %s", stage, parameters)
    try:
        submitted = mlflow.projects.run(
            str(PROJECT_DIR),
            entry_point=stage,
            parameters={key: str(value) for key, value in parameters.items()},
            env_manager=env_manager,
            experiment_id=experiment_id,
            synchronous=True,
            run_id=unfinished.info.run_id if unfinished else None,  # `mlflow run --run-id`
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


def find_unfinished(
    stage: str, parameters: dict, experiment_id: str, version: dict[str, str] | None = None
) -> Run | None:
    """The latest run of `stage` with equal typed parameters and the same commit that did not
    finish: KILLED, FAILED, or RUNNING with its process gone. A dirty tree is allowed: the
    stage's own key (tune's project, train's backup folder) decides what can be continued."""
    version = version or tracking.code_version()
    candidates = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=(
            f"tags.`{config.STAGE_TAG}` = '{stage}' "
            "and attributes.status != 'FINISHED' "
            f"and tags.`{config.COMMIT_TAG}` = '{version[config.COMMIT_TAG]}'"
        ),
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    wanted = typed(stage, parameters)
    for run in candidates:
        process = run.data.tags.get(config.PROCESS_TAG, "")
        if run.info.status == "SCHEDULED" or (
            run.info.status == "RUNNING" and (not process or tracking.process_alive(process))
        ):
            continue
        if typed(stage, run.data.params) == wanted:
            return run
    return None


def typed(stage: str, parameters: dict) -> argparse.Namespace | None:
    """Parameters parsed by the stage's own command line, so "0.15" equals ".15".

    Params that are not options of the stage are left out: they are results the stage
    logged itself (tune's best_*, train's tuned_*). `mlflow run` logs the values as it
    quoted them for the shell (an empty string as ''); they are unquoted first.
    """
    parse_args = importlib.import_module(f"pipeline.{stage}").parse_args
    options = vars(parse_args([]))
    argv = [
        f"--{key.replace('_', '-')}={unquote(str(value))}"
        for key, value in parameters.items()
        if key in options
    ]
    try:
        return parse_args(argv)
    except SystemExit:
        return None


def unquote(value: str) -> str:
    """A value as given, from the shell-quoted form `mlflow run` logs ('' for "", 'a b' for a b)."""
    if len(value) < 2 or value[0] != "'" or value[-1] != "'":
        return value
    try:
        words = shlex.split(value)
    except ValueError:
        return value
    return words[0] if len(words) == 1 else "" if not words else value
