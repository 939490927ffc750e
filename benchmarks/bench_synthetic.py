"""How fast the synthetic FER dataset is generated, and how learnable it is: small CNN against a linear probe.

The synthetic set is every newcomer's first dataset and every test's default, so it has to be quick to make (the
aim: 3,500 images in a couple of seconds) and it has to be a real vision problem: a small CNN should reach roughly
60-85 % after brief training while logistic regression on the standardised pixels stays at least 15 points lower.
The learnability recipe (model, epochs, sizes, probe) is the one tests/test_synthetic.py asserts on; this script
runs it over several data seeds and reports every figure, plus wall times (which the test never asserts).

Usage: .venv/bin/python benchmarks/bench_synthetic.py [--seeds 3] [--epochs 6]
Writes benchmarks/results/bench_synthetic.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from client.data.synthetic import make_synthetic  # noqa: E402
from tests.test_synthetic import (  # noqa: E402
    CNN_EPOCHS, TEST_SIZE, TRAIN_SIZE, _tensors, linear_probe_accuracy, train_cnn_accuracy,
)

# Wider than the test's grid and with more iterations: the probe gets every chance here.
PROBE_WEIGHT_DECAYS = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
PROBE_MAX_ITER = 500

RESULT = REPO / "benchmarks" / "results" / "bench_synthetic.json"


def _generation(n: int, repeats: int) -> dict:
    make_synthetic(50, seed=0)  # imports and first-call set-up out of the timing
    times = []
    for repeat in range(repeats):
        start = time.perf_counter()
        make_synthetic(n, seed=repeat)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"images": n, "seconds_best": round(best, 3), "seconds_median": round(statistics.median(times), 3),
            "images_per_second": round(n / best)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of independent train/test data seeds")
    parser.add_argument("--epochs", type=int, default=CNN_EPOCHS)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats for generation")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    generation = _generation(3500, args.repeats)
    print(f"generation: {generation['images']} images in {generation['seconds_best']} s "
          f"({generation['images_per_second']} images/s)")

    runs = []
    for seed in range(args.seeds):
        train = _tensors(TRAIN_SIZE, seed=1000 + seed)
        test = _tensors(TEST_SIZE, seed=2000 + seed)
        start = time.perf_counter()
        cnn = train_cnn_accuracy(train, test, epochs=args.epochs, seed=seed)
        cnn_seconds = time.perf_counter() - start
        start = time.perf_counter()
        probe = linear_probe_accuracy(train, test, weight_decays=PROBE_WEIGHT_DECAYS,
                                      max_iter=PROBE_MAX_ITER)
        probe_seconds = time.perf_counter() - start
        runs.append({"seed": seed, "cnn_accuracy": round(cnn, 4), "linear_probe_accuracy": round(probe, 4),
                     "cnn_train_seconds": round(cnn_seconds, 1), "probe_seconds": round(probe_seconds, 1)})
        print(f"seed {seed}: cnn {cnn:.3f} ({cnn_seconds:.1f} s), linear probe {probe:.3f} ({probe_seconds:.1f} s)")

    cnn_all = [r["cnn_accuracy"] for r in runs]
    probe_all = [r["linear_probe_accuracy"] for r in runs]
    gaps = [c - p for c, p in zip(cnn_all, probe_all, strict=True)]
    summary = {
        "cnn_accuracy_mean": round(statistics.mean(cnn_all), 4), "cnn_accuracy_min": min(cnn_all),
        "linear_probe_accuracy_mean": round(statistics.mean(probe_all), 4),
        "linear_probe_accuracy_max": max(probe_all),
        "gap_min_points": round(100 * min(gaps), 1), "chance": round(1 / 7, 4),
    }
    print(f"cnn mean {summary['cnn_accuracy_mean']:.3f}, probe mean {summary['linear_probe_accuracy_mean']:.3f}, "
          f"smallest gap {summary['gap_min_points']} points")
    result = {
        "generation": generation, "train_size": TRAIN_SIZE, "test_size": TEST_SIZE, "epochs": args.epochs,
        "probe_weight_decays": PROBE_WEIGHT_DECAYS, "probe_max_iter": PROBE_MAX_ITER,
        "runs": runs, "summary": summary,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average_before": load_before,
        "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    temporary = RESULT.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(RESULT)
    print(f"wrote {RESULT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
