"""Federated against centralised accuracy on FER2013 at the same number of passes over the data (issue 12 item 3).

    .venv/bin/python benchmarks/bench_fed_accuracy.py --model fer_vgg --rounds 10 \\
        [--setups central,dirichlet-0.5,dirichlet-0.1,profiles] [--strategy fedavg] [--set KEY=VALUE ...]
        [--cpus 1] [--quick]

Each setup trains the model with its registered recipe from the same seeded initial model for `--rounds` passes
(with `--set local_splits=S` a federated setup runs S x as many rounds, each on 1/S of every site's data):
`central` is `fer-sim centralized` on the pooled training data (one epoch a "round", the schedule over the same
rounds); the federated setups are `fer-sim run` with 10 sites, one local epoch a round, Dirichlet label skew
(alpha 0.5 or 0.1) or the hospital/IoT profile mix (hospital=0.3,iot=0.7 on Dirichlet 0.5). All are scored by
the server on FER2013 PublicTest after every round (reported, never tuned on). Writes
benchmarks/results/bench_fed_accuracy_<model>.json (each run's accuracy per round and wall-clock seconds, and
each federated run's ratio to `central`) and a PNG of accuracy against wall-clock minutes beside it.
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

from client.config import RunSettings  # noqa: E402
from privacy.atomic import atomic_write, atomic_write_with  # noqa: E402
from server.rundir import RunDirectory  # noqa: E402
from bench_accuracy import field_pairs  # noqa: E402  (benchmarks/ is the script's own folder on sys.path)

SETUPS = {
    "central": {},
    "dirichlet-0.5": {"partition": "dirichlet", "alpha": 0.5},
    "dirichlet-0.1": {"partition": "dirichlet", "alpha": 0.1},
    "profiles": {"partition": "dirichlet", "alpha": 0.5, "profile_mix": "hospital=0.3,iot=0.7"},
}


def settings_for(setup: str, *, dataset: str, model: str, rounds: int, strategy: str, seed: int,
                 out_dir: Path, extra: dict | None = None) -> RunSettings:
    """One setup's RunSettings: 10 sites, one local epoch a round, the model's recipe (issue 12's federation),
    with `extra` (RunSettings fields from --set) on top."""
    settings = RunSettings(dataset=dataset, num_clients=10, min_clients=10, model=model, num_server_rounds=rounds,
                           local_epochs=1, strategy=strategy, seed=seed, out_dir=str(out_dir), **SETUPS[setup])
    settings = settings.replace(**(extra or {}))
    # `rounds` counts passes: with local-splits S a federated round is 1/S of a pass, so it runs S x as many
    # rounds; the centralised baseline trains whole passes (fer-sim centralized refuses local-splits).
    if setup == "central":
        return settings.replace(local_splits=1, ntd_beta=0.0)  # nor a global model to distill from
    return settings.replace(num_server_rounds=rounds * settings.local_splits)


def run_setup(settings: RunSettings, *, central: bool, cpus: int) -> dict:
    """Runs one setup; returns its summary figures and per-round accuracy against elapsed seconds."""
    from simulation.centralized import run_centralized
    from simulation.runner import run_simulation

    run_dir = RunDirectory(settings.out_dir)
    started = time.perf_counter()
    if central:
        summary = run_centralized(settings, run_dir=run_dir)
    else:
        summary = run_simulation(settings, run_dir=run_dir, num_cpus=cpus)
    elapsed, curve, refit = 0.0, [], None
    for record in run_dir.rounds():
        elapsed += record.seconds or 0.0
        curve.append({"round": record.round, "passes": round(record.round / settings.local_splits, 3),
                      "accuracy": record.server_accuracy, "seconds": round(elapsed, 1)})
        if record.head_refit is not None:  # head-refit: the last round scores the re-fitted model; before it, this
            before = record.head_refit.server_before or {}
            refit = {"accuracy_before": before.get("accuracy"), "macro_f1_before": before.get("macro_f1"),
                     **{k: v for k, v in record.head_refit.to_json().items() if k != "server_before"}}
    result = {"final_accuracy": summary.final_accuracy, "best_accuracy": summary.best_accuracy,
              "macro_f1": summary.macro_f1, "wall_seconds": round(time.perf_counter() - started, 1), "curve": curve}
    return {**result, "head_refit": refit} if refit is not None else result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"))
    parser.add_argument("--model", default="fer_vgg")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--setups", default="central,dirichlet-0.5,dirichlet-0.1,profiles")
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="a RunSettings field for every setup, e.g. server_lr=1.0 (repeatable)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use for the simulated sites")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--quick", action="store_true", help="synthetic faces, 2 rounds: checks the script")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    setups = args.setups.split(",")
    extra = field_pairs(args.settings, RunSettings(), what="--set")
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        raise SystemExit(f"--setups: unknown {', '.join(unknown)}; known: {', '.join(SETUPS)}")
    dataset = "synthetic=2800" if args.quick else f"fer2013={args.data}"
    rounds = 2 if args.quick else args.rounds
    name = f"bench_fed_accuracy_{args.model}{'_quick' if args.quick else ''}.json"
    out = args.out or ROOT / "benchmarks" / "results" / name
    work = Path(tempfile.mkdtemp(prefix="bench-fed-acc-"))
    results: dict = {"dataset": dataset, "model": args.model, "rounds": rounds, "local_epochs": 1, "sites": 10,
                     "strategy": args.strategy, "settings": extra, "seed": args.seed, "cpus": args.cpus,
                     "note": "server accuracy on FER2013 PublicTest after each round (with the recipe's flip "
                             "averaging); same initial model and recipe in every setup", "runs": {}}
    for setup in setups:
        settings = settings_for(setup, dataset=dataset, model=args.model, rounds=rounds, strategy=args.strategy,
                                seed=args.seed, out_dir=work / setup, extra=extra)
        results["runs"][setup] = run_setup(settings, central=setup == "central", cpus=args.cpus)
        run = results["runs"][setup]
        print(f"{setup}: final {run['final_accuracy']:.4f}, best {run['best_accuracy']:.4f}, macro-F1 "
              f"{run['macro_f1']:.4f}, {run['wall_seconds'] / 60:.1f} min", flush=True)
        central = results["runs"].get("central")
        if central and setup != "central":
            run["ratio_to_central"] = round(run["final_accuracy"] / central["final_accuracy"], 4)
            print(f"  {run['ratio_to_central']:.3f} x centralised", flush=True)
        atomic_write(out, json.dumps(results, indent=2) + "\n")  # after every setup: a long run keeps what it has
    _plot(results, out.with_suffix(".png"))
    print(f"wrote {out}")


def _plot(results: dict, path: Path) -> None:
    """Server accuracy against wall-clock minutes, one line per setup (Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for setup, run in results["runs"].items():
        points = [p for p in run["curve"] if p["accuracy"] is not None]
        axes.plot([p["seconds"] / 60 for p in points], [p["accuracy"] for p in points], marker="o", label=setup)
    axes.set(xlabel="wall-clock time (min)", ylabel="PublicTest accuracy",
             title=f"{results['model']}: federated (10 sites) vs centralised")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    atomic_write_with(path, lambda handle: figure.savefig(handle, format="png"))


if __name__ == "__main__":
    main()
