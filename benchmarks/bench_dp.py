"""What local DP-SGD costs: training throughput against plain SGD, and how ε composes over rounds.

Part 1 (speed; aim ≥ 0.7× plain): samples/s of one client's training step on random 48×48 grayscale faces for
plain SGD and for DP-SGD through `privacy.dp.DPClient` (Opacus hooks, Opacus ghost clipping, hooks with the
secure-mode CSPRNG), all with the same `create_model(name, dp=True)` network, after one warm-up step.
Part 2 (accounting, no training): a client with ε = 3 for the federation, N = 3000, B = 64, 1 local epoch, 3
planned rounds; ε after rounds 1, 2, 3 as the ledger records it, the ε a fresh PrivacyEngine per round would
report (the "reset" value), and the ratio to Google's dp_accounting RDP accountant.

Usage: .venv/bin/python benchmarks/bench_dp.py [--model cnn_am] [--batch 32] [--steps 6]
Writes benchmarks/results/bench_dp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from privacy.accounting import compute_epsilon  # noqa: E402
from privacy.dp import DPClient, DPSettings  # noqa: E402
from privacy.ledger import PrivacyLedger, generate_key_file  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "bench_dp.json"


def _model(name: str) -> nn.Module:
    try:
        from models import create_model

        return create_model(name, dp=True)
    except Exception:  # models/ absent or the name unknown: a small GroupNorm CNN keeps the bench usable
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(512, 7),
        )


def _client(workdir: Path, tag: str, *, size: int, batch: int, rounds: int, secure: bool = False) -> DPClient:
    key = workdir / "key"
    if not key.exists():
        generate_key_file(key)
    ledger = PrivacyLedger.open(
        workdir / f"{tag}.ledger", key_file=key, anchor_path=workdir / "anchors" / f"{tag}.anchor",
        client_id=tag, budget_epsilon=3.0, delta=1e-5,
    )
    settings = DPSettings(epsilon=3.0, delta=1e-5, secure_mode=secure)
    return DPClient(settings=settings, ledger=ledger, dataset_size=size, batch_size=batch, local_epochs=1,
                    planned_rounds=rounds)


def _time_steps(model, optimizer, criterion, batches) -> float:
    """Samples per second over ``batches`` after the first (warm-up) one."""
    seen, start = 0, None
    for index, (x, y) in enumerate(batches):
        if index == 1:
            start = time.perf_counter()
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        if index >= 1:
            seen += len(y)
    return seen / (time.perf_counter() - start)


def _throughput(name: str, batch: int, steps: int, workdir: Path) -> dict[str, float]:
    size = batch * steps
    dataset = TensorDataset(torch.randn(size, 1, 48, 48), torch.randint(0, 7, (size,)))
    results = {}
    torch.manual_seed(0)
    model = _model(name)
    plain_batches = [(dataset.tensors[0][i : i + batch], dataset.tensors[1][i : i + batch]) for i in range(0, size, batch)]
    results["plain"] = _time_steps(model, torch.optim.SGD(model.parameters(), lr=0.01), nn.CrossEntropyLoss(), plain_batches)
    for label, mode, secure in (("dp_hooks", "hooks", False), ("dp_ghost", "ghost", False), ("dp_hooks_secure", "hooks", True)):
        torch.manual_seed(0)
        model = _model(name)
        client = _client(workdir, label, size=size, batch=batch, rounds=100, secure=secure)
        plan = client.begin_round(server_round=1)
        private = client.make_private(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                                      dataset=dataset, plan=plan, grad_sample_mode=mode)
        results[label] = _time_steps(private.model, private.optimizer, private.criterion, private.loader)
    return results


def _composition(workdir: Path) -> dict[str, object]:
    import dp_accounting

    epsilons = []
    for server_round in (1, 2, 3):
        client = _client(workdir, "composition", size=3000, batch=64, rounds=3)
        plan = client.begin_round(server_round=server_round)
        epsilons.append(client.status()["epsilon_spent"])
    sigma, rate, steps = plan.noise_multiplier, plan.sample_rate, plan.steps
    reset = compute_epsilon(history=[(sigma, rate, steps)], delta=1e-5)
    google = dp_accounting.rdp.RdpAccountant()
    google.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), 3 * steps))
    return {
        "noise_multiplier": sigma, "sample_rate": rate, "steps_per_round": steps,
        "epsilon_after_rounds": epsilons, "epsilon_if_reset_every_round": reset,
        "ratio_to_dp_accounting": epsilons[-1] / google.get_epsilon(1e-5),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="cnn_am", help="models registry name (built with dp=True)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed steps + 1 warm-up")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        speed = _throughput(args.model, args.batch, args.steps, Path(tmp))
        composition = _composition(Path(tmp))
    result = {
        "model": args.model, "batch": args.batch, "timed_steps": args.steps - 1,
        "samples_per_second": speed,
        "ratio_to_plain": {k: v / speed["plain"] for k, v in speed.items() if k != "plain"},
        "composition": composition,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before": load_before, "python": platform.python_version(), "torch": torch.__version__},
    }
    for label, rate in speed.items():
        print(f"{label:>16}: {rate:8.1f} samples/s" + ("" if label == "plain" else f"  ({rate / speed['plain']:.2f}x plain)"))
    eps = composition["epsilon_after_rounds"]
    print(f"epsilon after rounds 1/2/3: {eps[0]:.3f} / {eps[1]:.3f} / {eps[2]:.3f}; "
          f"a per-round engine would report {composition['epsilon_if_reset_every_round']:.3f}; "
          f"ratio to dp_accounting {composition['ratio_to_dp_accounting']:.4f}")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
