"""GroupNorm against BatchNorm with per-site statistics (FedBN) in a non-IID federation (issue 12 item 2).

    .venv/bin/python benchmarks/bench_fedbn.py [--model cnn_am_deep] [--rounds 10] [--alpha 0.5] [--quick]

FedBN (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization") averages
every parameter but the BatchNorm layers', which each site keeps: its own scale, shift and running statistics.
It needs no Flower feature to measure, so this script runs FedAvg in one process, Flower-free, over the same
sites `fer-sim run` builds (simulation.federation's plan: 10 sites, Dirichlet label skew, each site's local test
split held out), with the model's recipe, one local epoch a round, the schedule over the rounds:

- `gn`: the GroupNorm build, every parameter averaged (what federations train today);
- `fedbn`: the BatchNorm build, BatchNorm layers local to each site.

Each round both are scored on every site's local test split with the model that site would use (GN: the global
model; FedBN: the global model with the site's own BatchNorm), example-weighted; after the last round also on
FER2013 PublicTest (FedBN: the mean over the sites' models, since no global BatchNorm exists). A FedBN model
cannot be scored by the server or start another site: the coordinator has no BatchNorm to give it.
Writes benchmarks/results/bench_fedbn_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import task  # noqa: E402
from client.config import RunSettings  # noqa: E402
from client.data.preprocess import FERTorchDataset  # noqa: E402
from client.node_data import cached_dataset, node_data_from_indices  # noqa: E402
from models import create_model  # noqa: E402
from models.layers import batch_norm, group_norm  # noqa: E402
from privacy.atomic import atomic_write  # noqa: E402
from simulation.federation import federation_plan  # noqa: E402


def local_keys(model: nn.Module) -> set[str]:
    """The state_dict keys FedBN keeps on the site: every BatchNorm layer's parameters and buffers."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            keys.update(f"{name}.{key}" for key in module.state_dict())
    return keys


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, flip_tta: bool) -> tuple[int, int]:
    loader = DataLoader(FERTorchDataset(images, labels), batch_size=256)
    result = task.evaluate(model, loader, flip_tta=flip_tta)
    return int(round(result.accuracy * len(labels))), len(labels)


def federate(mode: str, *, settings: RunSettings, sites: list, test, rounds: int) -> dict:
    """FedAvg over `sites` for `rounds` rounds; `mode` "gn" or "fedbn". Returns the per-round local accuracy."""
    norm = group_norm if mode == "gn" else batch_norm
    torch.manual_seed(settings.seed)
    global_model = create_model(settings.model, norm_layer=norm)
    keep = local_keys(global_model) if mode == "fedbn" else set()
    global_state = {k: v.clone() for k, v in global_model.state_dict().items()}
    site_state = [{k: global_state[k].clone() for k in keep} for _ in sites]
    recipe = settings.recipe()
    curve, started = [], time.perf_counter()
    for server_round in range(1, rounds + 1):
        states, weights, correct, seen = [], [], 0, 0
        for index, data in enumerate(sites):
            model = create_model(settings.model, norm_layer=norm)
            model.load_state_dict({**global_state, **site_state[index]})
            local = task.prepare_training(model, data.train_images, data.train_labels, recipe=recipe,
                                          batch_size=settings.batch_size, seed=settings.seed * 1000 + index * 31
                                          + server_round, server_round=server_round, num_rounds=rounds)
            task.train(model, local.loader, epochs=1, optimizer=local.optimizer, criterion=local.criterion,
                       lr_at=local.lr_at)
            state = model.state_dict()
            site_state[index] = {k: state[k].clone() for k in keep}
            states.append(state)
            weights.append(len(data.train_labels))
        total = sum(weights)
        for key in global_state:
            if key in keep:
                continue
            if global_state[key].is_floating_point():
                global_state[key] = sum(s[key] * (w / total) for s, w in zip(states, weights))
            else:
                global_state[key] = states[0][key]
        models = []
        for index, data in enumerate(sites):
            model = create_model(settings.model, norm_layer=norm)
            model.load_state_dict({**global_state, **site_state[index]})
            models.append(model)
            hits, count = accuracy(model, data.test_images, data.test_labels, flip_tta=recipe.flip_tta)
            correct, seen = correct + hits, seen + count
        curve.append({"round": server_round, "local_accuracy": correct / seen,
                      "seconds": round(time.perf_counter() - started, 1)})
        print(f"{mode} round {server_round}: local test accuracy {correct / seen:.4f}", flush=True)
    scored = models if keep else models[:1]  # GN: every site holds the same global model
    per_model = [accuracy(m, test.images, test.labels, flip_tta=recipe.flip_tta) for m in scored]
    test_accuracy = float(np.mean([hits / count for hits, count in per_model]))
    return {"final_local_accuracy": curve[-1]["local_accuracy"], "publictest_accuracy": test_accuracy,
            "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "fer2013"))
    parser.add_argument("--model", default="cnn_am_deep")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--modes", default="gn,fedbn")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="synthetic faces, 2 rounds: checks the script")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = "synthetic=2800" if args.quick else f"fer2013={args.data}"
    rounds = 2 if args.quick else args.rounds
    settings = RunSettings(dataset=dataset, num_clients=10, min_clients=10, partition="dirichlet", alpha=args.alpha,
                           model=args.model, num_server_rounds=rounds, local_epochs=1)
    data = cached_dataset(dataset, settings.image_size, settings.seed)
    sites = [node_data_from_indices(data, plan.indices, client_id=plan.client_id,
                                    test_fraction=settings.local_test_fraction, seed=settings.seed + i)
             for i, plan in enumerate(federation_plan(settings))]
    test = data.splits["test"]
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_fedbn_{args.model}{'_quick' if args.quick else ''}.json"
    results: dict = {"dataset": dataset, "model": args.model, "rounds": rounds, "alpha": args.alpha, "sites": 10,
                     "local_epochs": 1, "runs": {}}
    for mode in args.modes.split(","):
        results["runs"][mode] = federate(mode, settings=settings, sites=sites, test=test, rounds=rounds)
        atomic_write(out, json.dumps(results, indent=2) + "\n")
    for mode, run in results["runs"].items():
        print(f"{mode}: local test accuracy {run['final_local_accuracy']:.4f}, PublicTest "
              f"{run['publictest_accuracy']:.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
