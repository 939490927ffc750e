"""How long loading FER2013's 28,709-image training folder into memory takes, and how much memory it peaks at.

Every federated run and every `fer-sim inspect` starts by loading a dataset, so this is the wait a researcher sees
before anything else happens (aim: under 30 s on a 2-core machine). Three measurements:
  1. `faces=<fer2013>/train`: the training folder alone, timed, with the process's peak RSS;
  2. the same again under tracemalloc, for the peak of Python/NumPy allocations (tracing slows it, so not timed);
  3. `fer2013=<fer2013>`: the whole dataset as `fer-sim inspect` loads it (train + test, format detection, audit).

Usage: .venv/bin/python benchmarks/bench_load.py [--data ../shared/data/fer2013]
Writes benchmarks/results/bench_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.data.formats import load_dataset  # noqa: E402
from client.data.formats.images import _worker_count  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "fer2013"
RESULT = REPO / "benchmarks" / "results" / "bench_load.json"


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="FER2013 image-folder copy")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        print(f"skipped: {args.data}/train not found")
        return 0

    load_before = os.getloadavg()[0]
    rss_before = _maxrss_mib()
    start = time.perf_counter()
    train = load_dataset(f"faces={args.data / 'train'}").splits["train"]
    train_seconds = time.perf_counter() - start
    rss_peak = _maxrss_mib()
    n_train, array_mib = len(train), train.images.nbytes / 2**20
    del train

    tracemalloc.start()
    load_dataset(f"faces={args.data / 'train'}")
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    start = time.perf_counter()
    full = load_dataset(f"fer2013={args.data}")
    full_seconds = time.perf_counter() - start

    result = {
        "train_images": n_train,
        "train_load_seconds": round(train_seconds, 2),
        "train_images_per_second": round(n_train / train_seconds),
        "train_array_mib": round(array_mib, 1),
        "peak_traced_mib": round(traced_peak / 2**20, 1),
        "maxrss_before_mib": round(rss_before, 1),
        "maxrss_after_train_mib": round(rss_peak, 1),
        "full_dataset_images": {name: len(split) for name, split in full.splits.items()},
        "full_dataset_load_seconds": round(full_seconds, 2),
        "decode_threads": _worker_count(),
        "cpu_count": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
    }
    for key, value in result.items():
        print(f"{key:28s} {value}")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    temporary = RESULT.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(temporary, RESULT)
    print(f"wrote {RESULT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
