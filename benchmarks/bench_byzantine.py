"""Byzantine robustness on FER2013: each aggregation strategy's accuracy with 3 of 15 sites hostile, per attack.

    .venv/bin/python benchmarks/bench_byzantine.py [--data ../shared/data/fer2013] [--rounds 5] [--per-class 0]
        [--strategies fedavg,fedavg+nb,fedmedian,fedtrimmedavg,krum] [--attacks none,scale,...] [--quick]

Every cell is one `fer-sim run` (the real ServerApp, ClientApp and guard on Flower's simulation engine): CNN-AM,
15 clients, Dirichlet alpha 1.0, 3 of them hostile (simulation/attacks.py, chosen by the seed; Krum is told 3).
`fedavg+nb` is FedAvg with server-side norm bounding (--norm-bound 1.5: updates scaled to at most 1.5x the round's
median norm). `none` is the honest baseline. The server's guard stays at its defaults (max-update-norm 100,
max-examples 1e6), so a x100 update from a site whose honest update exceeds norm 1 is rejected before any
strategy sees it: the table shows what a deployment would get, guard included.

`--per-class N` trains on N FER2013 training images per class and tests on N/3 per class (a reduced
configuration for slow machines; 0 uses all of FER2013). `--quick` uses synthetic faces and 1 round (checks that
the script runs). Prints a table of final server-side accuracy and writes benchmarks/results/bench_byzantine.json.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from client.config import RunSettings
from server.rundir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_byzantine.json"
STRATEGIES = {  # label -> run-config changes
    "fedavg": {"strategy": "fedavg"},
    "fedavg+nb": {"strategy": "fedavg", "norm_bound": 1.5},
    "fedmedian": {"strategy": "fedmedian"},
    "fedtrimmedavg": {"strategy": "fedtrimmedavg", "trimmed_beta": 0.2},
    "krum": {"strategy": "krum"},
}
ATTACKS = ["none", "scale", "sign-flip", "lie-count", "noise", "label-flip"]


def subsample_fer2013(source: Path, target: Path, *, per_class: int, seed: int) -> Path:
    """A FER2013 folder layout with `per_class` training and `per_class // 3` test images per class (symlinks)."""
    rng = random.Random(seed)
    for split, count in (("train", per_class), ("test", max(1, per_class // 3))):
        for emotion_dir in sorted((source / split).iterdir()):
            files = sorted(emotion_dir.glob("*.jpg"))
            rng.shuffle(files)
            out = target / split / emotion_dir.name
            out.mkdir(parents=True)
            for path in files[:count]:
                (out / path.name).symlink_to(path.resolve())
    return target


def run_cell(base: RunSettings, *, strategy: str, attack: str, out: Path) -> dict:
    from simulation.runner import run_simulation

    changes = dict(STRATEGIES[strategy])
    if attack != "none":
        changes.update(attackers=3, attack=attack)
    if changes["strategy"] == "krum":
        changes["krum_malicious"] = 3
    settings = base.replace(out_dir=str(out), **changes)
    run_dir = RunDirectory(out)
    started = time.perf_counter()
    summary = run_simulation(settings, run_dir=run_dir).to_json()
    rounds = [r.to_json() for r in run_dir.rounds()]
    trained = [r for r in rounds if r["round"] > 0]
    return {
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "macro_f1": summary["macro_f1"],
        "accuracy_per_round": [(r.get("server") or {}).get("accuracy") for r in rounds],
        "rejected_per_round": [r["fit"]["num_rejected"] for r in trained],
        "norm_bounded_per_round": [r["fit"].get("norm_bounded", {}).get("count", 0) for r in trained],
        "attackers": summary.get("attackers", []),
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--per-class", type=int, default=0, help="training images per class (0 = all of FER2013)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--quick", action="store_true", help="synthetic faces, 1 round: checks the script runs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-byz-"))
    if args.quick:
        dataset, rounds = "synthetic=1500", 1
    elif args.per_class:
        subset = subsample_fer2013(Path(args.data), work / "fer2013", per_class=args.per_class, seed=42)
        dataset, rounds = f"fer2013={subset}", args.rounds
    else:
        dataset, rounds = f"fer2013={args.data}", args.rounds
    base = RunSettings(dataset=dataset, num_clients=15, min_clients=15, partition="dirichlet", alpha=1.0,
                       model="cnn_am", num_server_rounds=rounds, local_epochs=args.local_epochs,
                       fraction_evaluate=0.0)
    strategies, attacks = args.strategies.split(","), args.attacks.split(",")
    results: dict = {
        "dataset": "synthetic=1500" if args.quick else f"fer2013 ({args.per_class or 'all'} train images per class)",
        "rounds": rounds, "clients": 15, "attackers": 3, "alpha": 1.0, "model": "cnn_am",
        "local_epochs": args.local_epochs, "seed": base.seed, "norm_bound_factor": 1.5, "cells": {},
    }
    for strategy in strategies:
        for attack in attacks:
            cell = run_cell(base, strategy=strategy, attack=attack, out=work / f"{strategy}-{attack}")
            results["cells"].setdefault(strategy, {})[attack] = cell
            print(f"{strategy:<14} {attack:<11} final accuracy {cell['final_accuracy']:.4f} "
                  f"(rejected {sum(cell['rejected_per_round'])}, {cell['seconds']:.0f}s)", flush=True)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{results['dataset']}, CNN-AM, 15 clients (3 hostile), {rounds} rounds: final server-side accuracy")
    print(f"{'':<14}" + "".join(f"{a:>11}" for a in attacks))
    for strategy in strategies:
        row = results["cells"][strategy]
        print(f"{strategy:<14}" + "".join(f"{row[a]['final_accuracy']:>11.4f}" for a in attacks))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
