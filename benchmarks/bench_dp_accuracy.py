"""Accuracy on the FER2013 test split under local DP-SGD at ε ∈ {1, 3, 8}, against the non-private federated run.

    .venv/bin/python benchmarks/bench_dp_accuracy.py [--data ../shared/data/fer2013] [--rounds 5] [--quick]
        [--set KEY=VALUE ...] [--technique LABEL:KEY=VALUE[,KEY=VALUE] ...] [--technique-epsilon 3]

The federation is bench_federated.py's: CNN-AM (GroupNorm build), 10 clients, Dirichlet α=0.5, 1 local epoch per
round. The non-private run trains with Adam at the default lr, batch 32; the DP runs with the DP recipe
(dp-optimizer / dp-lr / dp-batch-size: SGD momentum 0.9, 0.05, expected batch 128 by default; the options below
change it). ε is each client's budget for the WHOLE run (δ = 1e-5, RDP accountant, Poisson sampling); the noise
multiplier is calibrated from it. The non-private figure is taken from
benchmarks/results/bench_federated.json when that run used the same settings, and run here otherwise.

`--set` changes the whole set-up, the non-private run included (e.g. `public_fraction=0.1` for public pretraining:
the same public start for every run, so the ratios compare private with non-private training after it).
Each `--technique` is one more DP run at `--technique-epsilon`, with its RunSettings keys on top of the DP recipe
(e.g. `aug-4:aug_mult=4` or `head:dp_train=head`), so the table shows what each buys against the plain DP run at
that epsilon. Prints a table and writes benchmarks/results/bench_dp_accuracy.json (after every run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The sibling script by its own name: Python puts this folder on sys.path when a script in it runs (an unrelated
# `benchmarks` package in the venv shadows `benchmarks.bench_federated`).
from bench_accuracy import field_pairs  # noqa: E402
from bench_federated import federation  # noqa: E402
from client.config import RunSettings  # noqa: E402
from privacy.atomic import atomic_write  # noqa: E402
from server.rundir import RunDirectory  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_dp_accuracy.json"
FEDERATED = ROOT / "benchmarks" / "results" / "bench_federated.json"


def _federate(settings: RunSettings) -> dict:
    from simulation.runner import run_simulation

    started = time.perf_counter()
    run_dir = RunDirectory(settings.out_dir)
    summary = run_simulation(settings, run_dir=run_dir).to_json()
    rounds = [r.to_json() for r in run_dir.rounds()]
    privacy_path = Path(settings.out_dir) / "privacy.json"
    privacy = json.loads(privacy_path.read_text()) if privacy_path.exists() else None
    entry = {
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "macro_f1": summary["macro_f1"],
        "wall_seconds": time.perf_counter() - started,
        "failed_rounds": summary.get("failed_rounds"),
    }
    if rounds:
        entry["accuracy_per_round"] = [r["server"]["accuracy"] for r in rounds]
    if privacy and privacy.get("clients"):  # a non-private run with public pretraining reports no site
        clients = privacy["clients"]
        entry["epsilon_spent_max"] = max(c["epsilon_spent"] for c in clients)
        entry["noise_multiplier"] = sorted({round(c["noise_multiplier"], 4) for c in clients})
        entry["clients_reporting"] = len(clients)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--optimizer", default=None, help="sgd (default) | adam, for the DP runs")
    parser.add_argument("--lr", type=float, default=None, help="local learning rate of the DP runs")
    parser.add_argument("--batch-size", type=int, default=None, help="expected batch size of the DP runs")
    parser.add_argument("--local-epochs", type=int, default=None, help="local epochs per round of the DP runs")
    parser.add_argument("--max-grad-norm", type=float, default=None, help="per-sample clipping norm of the DP runs")
    parser.add_argument("--model", default=None, help="model of the DP runs (default: cnn_am, as the baseline)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="a RunSettings field for every run, the non-private one included (repeatable)")
    parser.add_argument("--technique", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                        help="one more DP run at --technique-epsilon with these RunSettings fields (repeatable)")
    parser.add_argument("--technique-epsilon", type=float, default=3.0)
    parser.add_argument("--out", default=str(RESULTS), help="where to write the JSON")
    parser.add_argument("--quick", action="store_true", help="synthetic data, 1 round: checks the script runs")
    args = parser.parse_args()

    dataset = "synthetic=1400" if args.quick else f"fer2013={args.data}"
    rounds = 1 if args.quick else args.rounds
    work = Path(tempfile.mkdtemp(prefix="bench-dp-acc-"))
    extra = field_pairs(args.settings, RunSettings(), what="--set")
    if args.quick:
        extra.setdefault("dp_batch_size", 32)  # --quick's sites hold ~100 faces, fewer than the expected batch of 128
    techniques = {}
    for spec in args.technique:
        label, _, pairs = spec.partition(":")
        techniques[label] = field_pairs(pairs.split(","), RunSettings(), what=f"--technique {label}")
    base = federation(dataset, rounds=rounds, model="cnn_am").replace(**extra)
    results: dict = {"dataset": dataset, "model": base.model, "rounds": rounds, "alpha": base.alpha, "lr": base.lr,
                     "delta": base.dp_delta, "accountant": base.accountant, "settings": extra,
                     "public_fraction": base.public_fraction, "init_model": base.init_model, "runs": {}}
    out = Path(args.out)

    reused = None
    if FEDERATED.exists() and not args.quick and not extra:
        previous = json.loads(FEDERATED.read_text())
        same = all(previous.get(k) == v for k, v in
                   {"dataset": dataset, "rounds": rounds, "lr": base.lr, "model": base.model, "seed": base.seed}.items())
        if same:
            reused = {**{k: previous["federated_10"][k] for k in ("final_accuracy", "best_accuracy", "macro_f1")},
                      "source": "bench_federated.json"}
    results["runs"]["non-private"] = reused or _federate(base.replace(out_dir=str(work / "plain")))
    _write(out, results)
    recipe = {k: v for k, v in {"dp_optimizer": args.optimizer, "dp_lr": args.lr, "dp_batch_size": args.batch_size,
                                "local_epochs": args.local_epochs, "max_grad_norm": args.max_grad_norm,
                                "model": args.model}.items()
              if v is not None}
    results["dp_recipe"] = {"dp_optimizer": base.dp_optimizer, "dp_lr": base.dp_lr,
                            "dp_batch_size": base.dp_batch_size, "local_epochs": base.local_epochs,
                            "max_grad_norm": base.max_grad_norm,
                            "model": base.model, **recipe}
    for epsilon in [float(e) for e in args.epsilons.split(",")]:
        print(f"epsilon {epsilon:g} ...", flush=True)
        results["runs"][f"epsilon={epsilon:g}"] = _federate(
            base.replace(dp_epsilon=epsilon, out_dir=str(work / f"eps{epsilon:g}"), **recipe)
        )
        _write(out, results)
    for label, keys in techniques.items():
        print(f"{label} at epsilon {args.technique_epsilon:g} ...", flush=True)
        run = _federate(base.replace(dp_epsilon=args.technique_epsilon, out_dir=str(work / f"t-{label}"),
                                     **{**recipe, **keys}))
        results["runs"][f"{label} (epsilon={args.technique_epsilon:g})"] = {**run, "technique": keys}
        _write(out, results)

    plain = results["runs"]["non-private"]["final_accuracy"]
    for run in results["runs"].values():
        run["ratio_to_non_private"] = round(run["final_accuracy"] / plain, 4) if plain else None
    _write(out, results)
    print(f"{dataset}: {base.model}, 10 clients, Dirichlet {base.alpha:g}, {rounds} rounds x {base.local_epochs} "
          f"local epoch, delta {base.dp_delta:g}, public fraction {base.public_fraction:g}")
    print(f"{'run':<28}{'final acc':>10}{'x non-priv':>11}{'best acc':>10}{'macro-F1':>10}{'eps spent':>10}"
          f"{'sigma':>16}")
    for name, run in results["runs"].items():
        spent = f"{run['epsilon_spent_max']:.3f}" if "epsilon_spent_max" in run else "-"
        sigma = ",".join(f"{s:g}" for s in run.get("noise_multiplier", [])) or "-"
        print(f"{name:<28}{run['final_accuracy']:>10.4f}{run['ratio_to_non_private']:>11.3f}"
              f"{run['best_accuracy']:>10.4f}{run['macro_f1']:>10.4f}{spent:>10}  {sigma}")
    print(f"wrote {out}")


def _write(out: Path, results: dict) -> None:
    """The results so far, atomically: a long benchmark keeps what it has measured if it is stopped."""
    atomic_write(out, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
