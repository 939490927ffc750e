"""Central (client-level) DP-FedAvg at scale (issue 13 item 4): 100 simulated sites, a fraction sampled per round.

    .venv/bin/python benchmarks/bench_central_dp.py [--sites 100] [--fraction 0.1] [--rounds 20]
        [--epsilons 1,3,8] [--clip 1.0] [--model fer_vgg] [--set KEY=VALUE ...] [--quick]

For each epsilon the server's noise multiplier is calibrated for the whole run (client-level, delta 1e-5, RDP,
`rounds` releases at sampling rate `fraction`: privacy.accounting.central_epsilon's analysis) and the federation
trains with every site clipping its update to `--clip` and one unit weight each (DP-FedAvg); a non-private run of
the same federation (no clipping, no noise) is the reference. `--set dp_train=head` trains (and noises) only the
classifier, on a public start (`--set public_fraction=0.2`): the non-private reference then trains the head too. FER2013 PublicTest is scored by the server after
every round. Beside the accuracies the script prints what decides the outcome before any training: the noise on
the averaged update, sigma * clip * sqrt(d) / sites-per-round in L2 norm, against the clip bound of one update.
Writes benchmarks/results/bench_central_dp.json (after every run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_accuracy import field_pairs  # noqa: E402  (benchmarks/ is the script's own folder on sys.path)
from client.config import RunSettings  # noqa: E402
from privacy.accounting import calibrate_noise_multiplier, central_epsilon  # noqa: E402
from privacy.atomic import atomic_write  # noqa: E402
from server.rundir import RunDirectory  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_central_dp.json"


def run(settings: RunSettings, *, cpus: int) -> dict:
    """One federation; its final and best server accuracy, per-round curve and wall-clock seconds."""
    from simulation.runner import run_simulation

    started = time.perf_counter()
    run_dir = RunDirectory(settings.out_dir)
    summary = run_simulation(settings, run_dir=run_dir, num_cpus=cpus)
    return {"final_accuracy": summary.final_accuracy, "best_accuracy": summary.best_accuracy,
            "macro_f1": summary.macro_f1, "wall_seconds": round(time.perf_counter() - started, 1),
            "accuracy_per_round": [r.server_accuracy for r in run_dir.rounds()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"))
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--fraction", type=float, default=0.1, help="fraction of the sites sampled each round")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip", type=float, default=1.0, help="L2 bound each site clips its update to")
    parser.add_argument("--model", default="fer_vgg")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="a RunSettings field for every run (repeatable)")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="synthetic faces, 2 rounds: checks the script")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    dataset = "synthetic=3000" if args.quick else f"fer2013={args.data}"
    rounds = 2 if args.quick else args.rounds
    per_round = max(1, round(args.sites * args.fraction))
    extra = field_pairs(args.settings, RunSettings(), what="--set")
    part = extra.pop("dp_train", "all")  # valid only with a DP mechanism: applied to each run below
    work = Path(tempfile.mkdtemp(prefix="bench-central-dp-"))
    base = RunSettings(dataset=dataset, num_clients=args.sites, min_clients=per_round, fraction_fit=args.fraction,
                       fraction_evaluate=0.0, partition="dirichlet", alpha=0.5, model=args.model,
                       num_server_rounds=rounds, local_epochs=1, dp_delta=args.delta).replace(**extra)
    from models import create_model
    from models.finetune import trainable_mask

    model = create_model(base.model, dp=True)
    # With `--set dp_train=head` (or last) only that part trains and gets noise: d is its size.
    dims = int(trainable_mask(model, part, input_size=(1, base.image_size, base.image_size)).sum())
    results: dict = {"dataset": dataset, "model": base.model, "dp_train": part, "noised_values": dims,
                     "parameters": sum(p.numel() for p in model.parameters()), "sites": args.sites,
                     "sites_per_round": per_round, "rounds": rounds, "delta": args.delta, "clip": args.clip,
                     "settings": extra, "runs": {}}

    def write() -> None:
        atomic_write(args.out, json.dumps(results, indent=2) + "\n")

    # The non-private reference trains the same part. RunSettings accepts dp-train only with a DP mechanism, so the
    # reference runs central DP with noise 1e-12 and a clip of 1e6 (never reached): it weighs sites uniformly as
    # the DP runs do, and differs from them only by their clip and noise.
    plain = base if part == "all" else base.replace(dp_train=part, central_dp_noise=1e-12, central_clip=1e6)
    results["runs"]["non-private"] = run(plain.replace(out_dir=str(work / "plain")), cpus=args.cpus)
    write()
    for epsilon in [float(e) for e in args.epsilons.split(",")]:
        sigma = calibrate_noise_multiplier(epsilon=epsilon, delta=args.delta, sample_rate=args.fraction,
                                           steps=rounds)
        spent = central_epsilon(noise_multiplier=sigma, sample_rate=args.fraction, rounds=rounds, delta=args.delta)
        noise_norm = sigma * args.clip * math.sqrt(dims) / per_round
        print(f"epsilon {epsilon:g}: sigma {sigma:.3f}, noise on the mean {noise_norm:.2f} (L2) against a clipped "
              f"update of at most {args.clip:g}", flush=True)
        entry = run(base.replace(central_dp_noise=sigma, central_clip=args.clip, dp_train=part,
                                 out_dir=str(work / f"eps{epsilon:g}")), cpus=args.cpus)
        results["runs"][f"epsilon={epsilon:g}"] = {**entry, "noise_multiplier": sigma, "epsilon_spent": spent,
                                                   "noise_l2_on_mean": noise_norm}
        write()
    plain = results["runs"]["non-private"]["final_accuracy"]
    print(f"{dataset}: {base.model} ({dims} values trained and noised), {args.sites} sites, {per_round} a round, {rounds} rounds")
    print(f"{'run':<14}{'final acc':>10}{'x non-priv':>11}{'sigma':>8}{'noise L2':>10}")
    for name, entry in results["runs"].items():
        entry["ratio_to_non_private"] = round(entry["final_accuracy"] / plain, 4) if plain else None
        sigma = f"{entry['noise_multiplier']:.3f}" if "noise_multiplier" in entry else "-"
        noise = f"{entry['noise_l2_on_mean']:.2f}" if "noise_l2_on_mean" in entry else "-"
        print(f"{name:<14}{entry['final_accuracy']:>10.4f}{entry['ratio_to_non_private']:>11.3f}{sigma:>8}{noise:>10}")
    write()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
