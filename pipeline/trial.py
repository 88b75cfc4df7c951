"""One tuning trial's training, in a process of its own.

TensorFlow keeps every traced ResNet50 training graph after its model is gone (about
550 MiB a trial on CPU; see README), so a search that trained all its trials in one
process would grow until it ran out of memory. `tune` starts
`python -m pipeline.trial SPEC` for each trial instead: the child builds, compiles and
fits one model as `tune.ResNetHyperModel` says, logs every epoch to the trial's MLflow
run, writes the per-epoch history to the spec's `result` file and exits, handing all of
its memory back.

`run` is the parent's side. The child dies with its parent (PR_SET_PDEATHSIG on Linux),
so a killed search leaves no training behind, and Ctrl-C in the parent stops it.
"""

import collections
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from pipeline import cli, files
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.trial")

SPEC_FILE = "trial-spec.json"
RESULT_FILE = "trial-result.json"
STOP_TIMEOUT_S = 10
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_PR_SET_PDEATHSIG = 1
# Loaded here, not after fork: the child may only call async-signal-safe code before exec.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def run(spec: dict, folder: Path) -> dict:
    """Train one trial in a child process as `spec` says; returns the child's result.

    `spec` holds arrays (an .npz with x_train, y_train, x_val, y_val), hyperparameters
    (the trial's values), schedule_epochs (what the learning-rate schedule spans), epochs,
    initial_epoch, augment, seed, precision, run_id (the trial's MLflow run),
    load_weights / checkpoint (weights files to start from / to keep the best epoch in,
    or None), and state_dir: where to leave the training state after the last epoch, as
    a fitting.Backup that `train` can continue (or None). The spec and the result are
    files in `folder`. The result holds history
    ({metric: [one value per epoch]}), steps (per epoch), pid and peak_rss_mib.

    The child's log goes to stderr as it comes. Raises PipelineError with its last lines
    when it fails; on Ctrl-C, or any error here, the child is stopped first.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = folder / SPEC_FILE, folder / RESULT_FILE
    result_path.unlink(missing_ok=True)
    files.write_text(spec_path, json.dumps({**spec, "result": str(result_path)}, indent=1))
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.trial", str(spec_path)],
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=child_environment(),
        preexec_fn=_die_with(os.getpid()) if _PRCTL else None,
    )
    tail = collections.deque(maxlen=40)
    copier = threading.Thread(target=_copy_lines, args=(process.stderr, tail), daemon=True)
    copier.start()
    try:
        code = process.wait()
    except BaseException:
        stop(process)
        raise
    finally:
        copier.join(timeout=5)
    if code != 0:
        raise PipelineError(
            f"the trial's training process {process.pid} {_ending(code)}: {_last_lines(tail)}"
        )
    try:
        return json.loads(result_path.read_text())
    except (OSError, ValueError) as error:
        raise PipelineError(
            f"the trial's training process {process.pid} left no readable result ({error})"
        ) from None


def child_environment() -> dict[str, str]:
    """This process's environment, with the MLflow store it uses and this copy of the package."""
    import mlflow

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    env.pop("MLFLOW_RUN_ID", None)  # the child logs to the trial's run by id, and starts none
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return env


def stop(process: subprocess.Popen) -> None:
    """End the child: SIGTERM, then SIGKILL after STOP_TIMEOUT_S."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _die_with(parent: int):
    def preexec() -> None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _copy_lines(stream, tail: collections.deque) -> None:
    for line in stream:
        sys.stderr.write(line)
        if line.strip():
            tail.append(line.rstrip())


def _ending(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        return f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exited with code {code}"


def _last_lines(tail: collections.deque, count: int = 3) -> str:
    """The child's last log lines on one line (Keras Tuner keeps the last line of an error)."""
    return " | ".join(list(tail)[-count:]) or "no output"


# The child's side


def train(spec: dict) -> dict:
    """Build, compile and fit the trial's model; see `run` for `spec` and the result."""
    import keras
    import keras_tuner
    import numpy as np

    from pipeline import fitting, tracking, tune

    with np.load(spec["arrays"]) as saved:
        arrays = {key: saved[key] for key in saved.files}
    hypermodel = tune.ResNetHyperModel(
        arrays, spec["schedule_epochs"], spec["augment"], spec["seed"], spec["precision"]
    )
    hp = keras_tuner.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    hp.values.update(spec["hyperparameters"])
    model = hypermodel.build(hp)
    if spec.get("load_weights"):
        model.load_weights(spec["load_weights"])
    logger = fitting.EpochLogger(spec["run_id"], len(arrays["x_train"]))
    # The start of a longer training averages its weights where that training would.
    average = fitting.WeightAverage(spec["schedule_epochs"]) if spec.get("state_dir") else None
    callbacks = [callback for callback in (average, logger) if callback is not None]
    if spec.get("checkpoint"):
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                spec["checkpoint"],
                monitor=tune.OBJECTIVE,
                mode="max",
                save_best_only=True,
                save_weights_only=True,
            )
        )
    history = hypermodel.fit(
        hp, model, epochs=spec["epochs"], initial_epoch=spec["initial_epoch"], callbacks=callbacks, verbose=0
    )
    if spec.get("state_dir"):
        fitting.Backup(Path(spec["state_dir"]), average=average, interval_s=0).save(model, logger.rows)
    return {
        "history": {key: [float(value) for value in values] for key, values in history.history.items()},
        "steps": history.params["steps"],
        "pid": os.getpid(),
        "peak_rss_mib": tracking.peak_rss_mib(),
    }


def parse_args(argv: list[str] | None):
    parser = cli.parser("trial", "Train one tuning trial (started by the tune stage, not by hand).")
    parser.add_argument("spec", type=Path, help="the trial's spec (JSON), written by tune")
    return parser.parse_args(argv)


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    spec = json.loads(args.spec.read_text())
    result = train(spec)
    files.write_text(Path(spec["result"]), json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
