"""SecAgg+ round time against plain FedAvg for whole federated rounds (local training included), 5 and 10 clients.

    .venv/bin/python benchmarks/bench_secagg_rounds.py [--rounds 4] [--faces 4000] [--quick]

bench_secagg.py times the protocol alone (clients return a cached update), the worst case for the ratio. This one
times what a coordinator waits for: `fer-sim run` rounds of CNN-AM (1 local epoch) on the synthetic faces, once
plain and once with `--secure-agg` (our hardened SecAgg+ on Flower's legacy workflow; shares 5, threshold 3),
in Flower's simulation engine on this machine. The first round is left out (Ray workers warming up); the figure
is the median of the others. Every round must aggregate: a failed round fails the benchmark.
Writes benchmarks/results/bench_secagg_rounds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.config import RunSettings  # noqa: E402
from server.rundir import RunDirectory  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_secagg_rounds.json"


def _round_seconds(settings: RunSettings) -> dict:
    from simulation.runner import run_simulation

    run_dir = RunDirectory(settings.out_dir)
    started = time.perf_counter()
    summary = run_simulation(settings, run_dir=run_dir).to_json()
    rounds = [r.to_json() for r in run_dir.rounds()]
    failed = [r["round"] for r in rounds if r.get("fit", {}).get("failed")]
    if failed:
        raise SystemExit(f"rounds {failed} failed under {'SecAgg+' if settings.secure_agg else 'plain'}")
    seconds = [r["seconds"] for r in rounds if r["round"] >= 2]
    return {
        "round_seconds": [r["seconds"] for r in rounds if r["round"] >= 1],
        "median_s": statistics.median(seconds),
        "final_accuracy": summary["final_accuracy"],
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--faces", type=int, default=4000)
    parser.add_argument("--clients", default="5,10")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 600 faces, 5 clients: checks the script runs")
    args = parser.parse_args()
    rounds, faces, clients = (2, 600, [5]) if args.quick else (args.rounds, args.faces,
                                                                [int(c) for c in args.clients.split(",")])
    work = Path(tempfile.mkdtemp(prefix="bench-secagg-rounds-"))
    results: dict = {"benchmark": "bench_secagg_rounds", "model": "cnn_am", "dataset": f"synthetic={faces}",
                     "rounds": rounds, "local_epochs": 1, "secagg_shares": 5, "secagg_threshold": 3,
                     "load_average_at_start": list(os.getloadavg()), "settings": {}}
    for num_clients in clients:
        base = RunSettings(dataset=f"synthetic={faces}", num_clients=num_clients, min_clients=num_clients,
                           partition="iid", model="cnn_am", num_server_rounds=rounds, local_epochs=1,
                           secagg_shares=5, secagg_threshold=3)
        entry = {}
        for name, secure in (("plain", False), ("secagg", True)):
            print(f"{num_clients} clients, {name} ...", flush=True)
            entry[name] = _round_seconds(base.replace(secure_agg=secure, out_dir=str(work / f"{num_clients}-{name}")))
        entry["ratio"] = entry["secagg"]["median_s"] / entry["plain"]["median_s"]
        results["settings"][f"{num_clients} clients"] = entry
    results["load_average_at_end"] = list(os.getloadavg())
    out = RESULTS if not args.quick else work / "bench_secagg_rounds.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"CNN-AM, {faces} synthetic faces split IID, 1 local epoch, median of rounds 2..{rounds}")
    print(f"{'clients':<10}{'plain s':>10}{'SecAgg+ s':>12}{'ratio':>8}")
    for name, entry in results["settings"].items():
        plain, secagg = entry["plain"]["median_s"], entry["secagg"]["median_s"]
        print(f"{name:<10}{plain:>10.2f}{secagg:>12.2f}{entry['ratio']:>8.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
