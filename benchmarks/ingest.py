"""Time ingest on an archive: wall time (median and range of N runs) and peak resident memory.

    python benchmarks/ingest.py --source ../shared/datasets/sign-language-digits.zip --repeat 3

Each repetition runs in a fresh process with a fresh cache, so every run downloads nothing but
unpacks, decodes and writes everything. Prints a table and writes it as JSON.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys
from pathlib import Path
from pipeline import ingest, tracking
ingest.run(sys.argv[1], Path(sys.argv[2]) / "out", data_dir=Path(sys.argv[2]) / "cache")
print(tracking.peak_rss_mib())
"""


def measure(source: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", CHILD, source, tmp], capture_output=True, text=True, check=True
        )
        wall = time.perf_counter() - start
    return wall, float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/ingest.json"))
    args = parser.parse_args()
    walls, peaks = zip(*(measure(args.source) for _ in range(args.repeat)))
    result = {
        "source": args.source,
        "repeat": args.repeat,
        "wall_s_median": round(statistics.median(walls), 2),
        "wall_s_range": [round(min(walls), 2), round(max(walls), 2)],
        "peak_rss_mib_max": round(max(peaks), 1),
    }
    print(
        f"{'ingest':<8} wall {result['wall_s_median']:.2f} s (range {result['wall_s_range'][0]:.2f}-"
        f"{result['wall_s_range'][1]:.2f}) peak RSS {result['peak_rss_mib_max']:.0f} MiB"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
