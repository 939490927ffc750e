"""Federated vs centralised on real FER2013, time per round, and peak memory for 10 and 100 simulated clients.

    .venv/bin/python benchmarks/bench_federated.py [--data ../shared/data/fer2013] [--rounds 5] [--quick]

Runs (1) `fer-sim run` with CNN-AM, 10 clients, Dirichlet α=0.5; (2) `fer-sim centralized` on the same clients'
pooled training data for the same number of passes; (3) memory runs with 10 and 100 simulated clients. Memory is
the peak of the summed resident set of this process and all its children (Ray's workers), sampled every 0.2 s.
Prints a table and writes benchmarks/results/bench_federated.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from client.config import RunSettings
from server.rundir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_federated.json"


def federation(dataset: str, *, rounds: int, model: str) -> RunSettings:
    """The benchmarked federation: 10 clients, Dirichlet α=0.5, one local epoch of batch 32 a round.

    bench_dp_accuracy.py runs its DP federations on it too, so its non-private figure can be this script's.
    """
    return RunSettings(dataset=dataset, num_clients=10, min_clients=10, partition="dirichlet", alpha=0.5,
                       model=model, num_server_rounds=rounds, local_epochs=1, batch_size=32)


def _tree_rss_bytes(root: int) -> int:
    """Summed VmRSS of `root` and all its descendants, read from /proc (Linux; no psutil needed)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # the command name (field 2) may hold spaces; the parent pid follows its closing parenthesis
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class PeakMemory:
    """Samples the summed RSS of this process tree (the driver and Ray's workers) in a background thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(me))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _run(settings: RunSettings, mode: str) -> tuple[dict, list[dict], int]:
    from simulation.centralized import run_centralized
    from simulation.runner import run_simulation

    run_dir = RunDirectory(settings.out_dir)
    with PeakMemory() as memory:
        if mode == "centralized":
            summary = run_centralized(settings, run_dir=run_dir).to_json()
        else:
            summary = run_simulation(settings, run_dir=run_dir).to_json()
    return summary, [r.to_json() for r in run_dir.rounds()], memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default="cnn_am")
    parser.add_argument("--quick", action="store_true", help="synthetic data, 2 rounds: checks the script runs")
    args = parser.parse_args()

    dataset = "synthetic=2800" if args.quick else f"fer2013={args.data}"
    rounds = 2 if args.quick else args.rounds
    work = Path(tempfile.mkdtemp(prefix="bench-fed-"))
    base = federation(dataset, rounds=rounds, model=args.model)
    results: dict = {"dataset": dataset, "model": args.model, "rounds": rounds, "alpha": base.alpha, "lr": base.lr,
                     "local_epochs": base.local_epochs, "batch_size": base.batch_size, "seed": base.seed}

    fed, fed_rounds, fed_mem = _run(base.replace(out_dir=str(work / "fed10")), "federated")
    cen, cen_rounds, cen_mem = _run(base.replace(out_dir=str(work / "central")), "centralized")
    per_round = [r["seconds"] for r in fed_rounds if r["round"] > 0]
    results["federated_10"] = {
        "final_accuracy": fed["final_accuracy"], "best_accuracy": fed["best_accuracy"], "macro_f1": fed["macro_f1"],
        "accuracy_per_round": [r["server"]["accuracy"] for r in fed_rounds],
        "seconds_per_round": per_round, "mean_seconds_per_round": sum(per_round) / len(per_round),
        "wall_seconds": fed["wall_seconds"], "bytes_per_round": fed["bytes_per_round"], "peak_rss_mib": fed_mem / 2**20,
        "client_accuracy": fed.get("client_accuracy"),
    }
    results["centralized"] = {
        "final_accuracy": cen["final_accuracy"], "best_accuracy": cen["best_accuracy"], "macro_f1": cen["macro_f1"],
        "accuracy_per_epoch_block": [r["server"]["accuracy"] for r in cen_rounds],
        "seconds": cen["seconds"], "peak_rss_mib": cen_mem / 2**20, "train_examples": cen["train_examples"],
    }

    # Memory at scale: 100 clients, 10 % sampled per round, one round.
    hundred = base.replace(num_clients=100, min_clients=100, fraction_fit=0.1, fraction_evaluate=0.1,
                           num_server_rounds=1, out_dir=str(work / "fed100"))
    h_summary, h_rounds, h_mem = _run(hundred, "federated")
    results["federated_100"] = {"peak_rss_mib": h_mem / 2**20, "wall_seconds": h_summary["wall_seconds"],
                                "seconds_per_round": h_rounds[-1]["seconds"]}
    results["federated_10"]["peak_rss_mib_note"] = "driver + Ray workers (2 in parallel on 2 cores)"

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    f10, c = results["federated_10"], results["centralized"]
    print(f"dataset {dataset}, model {args.model}, {rounds} rounds x 1 local epoch, Dirichlet alpha 0.5")
    print(f"{'':<26}{'final acc':>10}{'best acc':>10}{'macro-F1':>10}{'s/round':>10}{'peak MiB':>10}")
    print(f"{'federated, 10 clients':<26}{f10['final_accuracy']:>10.4f}{f10['best_accuracy']:>10.4f}"
          f"{f10['macro_f1']:>10.4f}{f10['mean_seconds_per_round']:>10.1f}{f10['peak_rss_mib']:>10.0f}")
    print(f"{'centralized (same data)':<26}{c['final_accuracy']:>10.4f}{c['best_accuracy']:>10.4f}"
          f"{c['macro_f1']:>10.4f}{c['seconds'] / rounds:>10.1f}{c['peak_rss_mib']:>10.0f}")
    print(f"{'federated, 100 clients':<26}{'':>30}{results['federated_100']['seconds_per_round']:>10.1f}"
          f"{results['federated_100']['peak_rss_mib']:>10.0f}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
