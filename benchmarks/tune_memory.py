"""Memory of a tuning search: the search's resident memory after each trial, each trial process's peak.

    python benchmarks/tune_memory.py --source ../shared/datasets/sign-language-digits.zip --trials 4

Runs a real search as production does (graph mode, each trial in its own process) on
`--per-class` photos per digit at `--image-size`, in a temporary folder with its own
SQLite store, then reads what every trial logged: `rss_mib` (the search process after
the trial) and `trial_peak_rss_mib` (the trial's process at its peak). Prints a table
and writes it as JSON.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this copy of the package, not an installed one


def measure(args: argparse.Namespace, tmp: Path) -> list[dict]:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["SIGN_DIGITS_TUNER_DIR"] = str(tmp / "tuner")
    import mlflow

    from pipeline import config, ingest, onehot, tune

    dataset = ingest.run(
        args.source,
        tmp / "ingest",
        image_size=args.image_size,
        max_per_class=args.per_class,
        data_dir=tmp / "cache",
    )
    arrays = dict(dataset.arrays)
    for split in config.SPLITS:
        arrays[f"y_{split}"] = onehot.encode(arrays[f"y_{split}"])
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("tune-memory")
    with mlflow.start_run() as parent:
        tune.run(
            arrays,
            tmp / "out",
            oracle="random",
            max_trials=args.trials,
            epochs_per_trial=args.epochs,
            precision=args.precision,
        )
    trials = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        output_format="list",
    )
    rows = []
    for run in sorted(trials, key=lambda run: int(run.data.tags[tune.TRIAL_ID_TAG])):
        peak = run.data.metrics.get("trial_peak_rss_mib")  # None where trials train in this process
        rows.append(
            {
                "trial": run.data.tags[tune.TRIAL_ID_TAG],
                "batch_size": int(run.data.params["batch_size"]),
                "search_rss_mib": round(run.data.metrics["rss_mib"]),
                "trial_peak_rss_mib": None if peak is None else round(peak),
                "seconds": round((run.info.end_time - run.info.start_time) / 1000),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial")
    parser.add_argument("--per-class", type=int, default=10, help="photos per digit")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/tune_memory.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, Path(tmp))
    print(f"{'trial':>5} {'batch':>5} {'search RSS after':>16} {'trial peak RSS':>14} {'seconds':>7}")
    for row in rows:
        print(
            f"{row['trial']:>5} {row['batch_size']:>5} {row['search_rss_mib']:>12} MiB "
            f"{str(row['trial_peak_rss_mib']):>10} MiB {row['seconds']:>7}"
        )
    growth = rows[-1]["search_rss_mib"] / rows[1]["search_rss_mib"] - 1 if len(rows) > 1 else 0.0
    print(f"search RSS after the last trial vs after the second: {growth:+.1%}")
    result = {
        **vars(args),
        "output": str(args.output),
        "trials_measured": rows,
        "growth_second_to_last": growth,
    }
    result["wall_s"] = round(time.perf_counter() - started)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
