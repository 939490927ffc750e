"""SecAgg+ round time against a plain FedAvg round, at 5 and 10 clients, with a CNN-sized update (1.2 M floats).

Three fit workflows run the same round on the same in-process runtime (`tests.secagg_runtime`: Flower's link state
and grid, protobuf on the wire, two client threads on two cores); the clients return cached model deltas and do no
training, so the figures are the protocol's own cost, the worst case for the ratio:
  plain     Flower's default fit workflow + FedAvg;
  flower    Flower 1.41's SecAggPlusWorkflow + secaggplus_mod, stock;
  hardened  server.secagg.make_secagg_workflow + privacy.secagg.make_secagg_mod.
It also times where the time goes: each server stage, the SecAgg+ work inside the client mod per stage (mod time
minus the wrapped app's time, summed over clients), and the primitives one by one on the full vector.

Usage: .venv/bin/python benchmarks/bench_secagg.py [--rounds 3] [--repeats 2]
Writes benchmarks/results/bench_secagg.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flwr.app import Context  # noqa: E402
from flwr.client import NumPyClient  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import ndarray_to_bytes, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares  # noqa: E402
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key  # noqa: E402
from flwr.common.secure_aggregation.quantization import quantize  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402
from flwr.server import LegacyContext, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow  # noqa: E402
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD  # noqa: E402
from flwr.server.workflow.default_workflows import default_fit_workflow  # noqa: E402
from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes  # noqa: E402

from client.node_config import secagg_options  # noqa: E402
from privacy.secagg import make_secagg_mod  # noqa: E402
from privacy.secagg_masks import apply_mask, quantize_weighted  # noqa: E402
from server.secagg import make_secagg_workflow  # noqa: E402
from tests.secagg_runtime import run_in_process  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "bench_secagg.json"
# A small CNN's tensors (conv 1-32-64-128-256, fc 12544->64... folded to 1024x784 -> 7): 1,198,855 floats.
SHAPES = [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 64, 3, 3), (128,), (256, 128, 3, 3), (256,),
          (1024, 784), (1024,), (7, 1024), (7,)]
CLIPPING_RANGE = 1.0  # = the clients' L2 clip: no weighted value can reach it
QUANTIZATION_RANGE = 2**24  # 255 clients x 2**24 < 2**32
MAX_WEIGHT = 1000.0
UPDATE_NORM = 0.5
MODES = ("plain", "flower", "hardened")


def _delta(partition: int) -> list[np.ndarray]:
    rng = np.random.default_rng(partition)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]
    norm = math.sqrt(sum(float(np.dot(a.ravel().astype(np.float64), a.ravel())) for a in arrays))
    return [a * np.float32(UPDATE_NORM / norm) for a in arrays]


def _num_examples(partition: int) -> int:
    return 500 + 50 * partition


class _Timer:
    """Wall-clock round times, plus CPU seconds, which a shared machine's other load does not inflate."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)

    def round(self, fit_workflow: Callable[..., Any]) -> Callable[..., Any]:
        """Times a whole round: wall clock, and the CPU of every thread of this process (server and clients)."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fit_workflow(*args, **kwargs)
            finally:
                self.seconds["round wall"].append(time.perf_counter() - wall)
                self.seconds["round cpu"].append(time.process_time() - cpu)

        return timed

    def server_stage(self, name: str, stage: Callable[..., Any]) -> Callable[..., Any]:
        """CPU of the server thread in one stage (its own work, not the clients' it waits for)."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return stage(*args, **kwargs)
            finally:
                self.seconds[f"server {name}"].append(time.thread_time() - started)

        return timed

    def client_mod(self, mod: Callable[..., Any]) -> Callable[..., Any]:
        """CPU of the mod's own work per stage, summed over clients: the whole call minus the wrapped app."""

        def wrapper(msg, ctxt, call_next):
            stage = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
            inner: list[float] = []

            def timed_next(m, c):
                started = time.thread_time()
                try:
                    return call_next(m, c)
                finally:
                    inner.append(time.thread_time() - started)

            started = time.thread_time()
            try:
                return mod(msg, ctxt, timed_next)
            finally:
                self.seconds[f"client {stage}"].append(time.thread_time() - started - sum(inner))

        return wrapper


class _CachedDeltaClient(NumPyClient):
    def __init__(self, partition: int, deltas: dict[int, list[np.ndarray]], dropouts: int) -> None:
        self.partition = partition
        self.deltas = deltas
        self.dropouts = dropouts

    def fit(self, parameters, config):
        if self.partition < self.dropouts:
            raise ConnectionError("node lost during training")
        return self.deltas[self.partition], _num_examples(self.partition), {}


@dataclass(frozen=True)
class _Setting:
    clients: int
    shares: int
    threshold: int
    dropouts: int = 0

    @property
    def name(self) -> str:
        name = f"{self.clients} clients, {self.shares} shares, threshold {self.threshold}"
        return name + (f", {self.dropouts} dropout" if self.dropouts else "")


SETTINGS = (_Setting(5, 5, 3), _Setting(10, 5, 3), _Setting(10, 5, 3, dropouts=1), _Setting(10, 10, 6))


def _run(mode: str, setting: _Setting, rounds: int, deltas: dict[int, list[np.ndarray]]) -> dict[str, Any]:
    timer = _Timer()
    num_clients, num_shares, threshold = setting.clients, setting.shares, setting.threshold
    if mode == "plain":
        fit_workflow, mods = default_fit_workflow, []
    elif mode == "flower":
        workflow = SecAggPlusWorkflow(
            num_shares, threshold, max_weight=MAX_WEIGHT, clipping_range=CLIPPING_RANGE,
            quantization_range=QUANTIZATION_RANGE,
        )
        fit_workflow, mods = workflow, [timer.client_mod(secaggplus_mod)]
    else:
        workflow = make_secagg_workflow(
            num_shares=num_shares, reconstruction_threshold=threshold, clipping_range=CLIPPING_RANGE,
            quantization_range=QUANTIZATION_RANGE, max_weight=MAX_WEIGHT,
        )
        mod = make_secagg_mod(max_norm=CLIPPING_RANGE, node_options=secagg_options)
        fit_workflow, mods = workflow, [timer.client_mod(mod)]
    if mode != "plain":
        for stage in ("setup", "share_keys", "collect_masked_vectors", "unmask"):
            setattr(workflow, f"{stage}_stage", timer.server_stage(stage, getattr(workflow, f"{stage}_stage")))

    client_app = ClientApp(
        client_fn=lambda context: _CachedDeltaClient(
            int(context.node_config["partition-id"]), deltas, setting.dropouts
        ).to_client(),
        mods=mods,
    )
    captured: dict[str, Any] = {}

    def server_main(grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_evaluate=0.0,
            min_fit_clients=num_clients,
            min_available_clients=num_clients,
            initial_parameters=ndarrays_to_parameters([np.zeros(s, np.float32) for s in SHAPES]),
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=timer.round(fit_workflow))(grid, legacy)
        record = legacy.state.array_records[MAIN_PARAMS_RECORD]
        captured["global"] = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True))

    run_in_process(server_main, client_app, num_nodes=num_clients)
    breakdown = {k: sum(v) / rounds for k, v in timer.seconds.items() if not k.startswith("round")}
    return {
        "wall": timer.seconds["round wall"],
        "cpu": timer.seconds["round cpu"],
        "breakdown": breakdown,
        "aggregate": captured["global"],
    }


def _time(fn: Callable[[], Any], repeats: int = 5) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def _primitives(delta: list[np.ndarray]) -> dict[str, float]:
    """Seconds per call of each primitive: on the full vector, or for one key at 6-of-10 sharing."""
    size = 1 + sum(a.size for a in delta)
    shapes = [(1,)] + [a.shape for a in delta]
    sk, pk = generate_key_pairs()
    sk_other, _ = generate_key_pairs()
    pem = private_key_to_bytes(sk)
    scalar = sk.private_numbers().private_value.to_bytes(48, "big")
    pem_shares, scalar_shares, seed_shares = (create_shares(s, 6, 10) for s in (pem, scalar, b"s" * 32))
    masked64 = [np.zeros(s, np.int64) for s in shapes]
    masked32 = [np.zeros(s, np.uint32) for s in shapes]
    vector = np.zeros(size, np.uint32)
    return {
        "flower mask (RandomState, 32-bit seed)": _time(lambda: pseudo_rand_gen(b"k" * 32, 2**32, shapes)),
        "hardened mask, applied in place (HKDF + AES-256-CTR)": _time(
            lambda: apply_mask(vector, b"k" * 32, num_range=2**32)
        ),
        "flower quantize (np.clip + stochastic round)": _time(
            lambda: quantize(delta, CLIPPING_RANGE, QUANTIZATION_RANGE)
        ),
        "hardened quantize (checked, chunked float64)": _time(
            lambda: quantize_weighted(
                delta, weight=0.5, clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION_RANGE
            )
        ),
        "flower serialise masked vector (int64)": _time(lambda: [ndarray_to_bytes(a) for a in masked64]),
        "hardened serialise masked vector (uint32)": _time(lambda: [ndarray_to_bytes(a) for a in masked32]),
        "key pair generation (2 x SECP384R1)": _time(lambda: (generate_key_pairs(), generate_key_pairs())),
        "key agreement (ECDH + HKDF, one neighbour)": _time(lambda: generate_shared_key(sk_other, pk)),
        "Shamir split 6-of-10, mask seed (32 B)": _time(lambda: create_shares(b"s" * 32, 6, 10)),
        "Shamir split 6-of-10, secret key as PEM (flower)": _time(lambda: create_shares(pem, 6, 10)),
        "Shamir split 6-of-10, secret key as scalar (hardened)": _time(lambda: create_shares(scalar, 6, 10)),
        "Shamir rebuild, mask seed from 6 shares": _time(lambda: combine_shares(seed_shares[:6])),
        "Shamir rebuild, PEM key from 10 shares (flower)": _time(lambda: combine_shares(pem_shares)),
        "Shamir rebuild, scalar key from 6 shares (hardened)": _time(lambda: combine_shares(scalar_shares[:6])),
    }


def _print_setting(name: str, entry: dict[str, Any]) -> None:
    print(f"{name}: round time wall / CPU (median), ratio to plain wall / CPU")
    for mode in MODES:
        e = entry[mode]
        line = (f"  {mode:9s} {e['wall_s_median']:6.3f} / {e['cpu_s_median']:6.3f} s"
                f"   x{e['wall_ratio']:.2f} / x{e['cpu_ratio']:.2f}")
        if mode != "plain":
            line += f"   max|err| {e['max_abs_error_vs_plain']:.1e} (bound {entry['error_bound']:.1e})"
        print(line)
    for mode in MODES[1:]:
        parts = ", ".join(f"{k} {v:.3f}" for k, v in entry[mode]["cpu_breakdown_s_per_round"].items())
        print(f"    {mode} CPU s/round: {parts}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, interleaved across modes")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)

    load_before = os.getloadavg()[0]
    deltas = {p: _delta(p) for p in range(max(s.clients for s in SETTINGS))}
    results: dict[str, Any] = {}
    for mode in MODES:
        # Warm-up: the first rounds in a process pay for lazy imports and first-touch allocations.
        _run(mode, _Setting(3, 3, 2), 1, deltas)
    for setting in SETTINGS:
        walls: dict[str, list[float]] = defaultdict(list)
        cpus: dict[str, list[float]] = defaultdict(list)
        breakdowns: dict[str, list[dict[str, float]]] = defaultdict(list)
        aggregates: dict[str, list[np.ndarray]] = {}
        # Interleaved so that the shared machine's load falls on every mode alike.
        for _ in range(args.repeats):
            for mode in MODES:
                run = _run(mode, setting, args.rounds, deltas)
                walls[mode] += run["wall"]
                cpus[mode] += run["cpu"]
                breakdowns[mode].append(run["breakdown"])
                aggregates[mode] = run["aggregate"]
        survivors = range(setting.dropouts, setting.clients)
        weights = [round(_num_examples(p) / MAX_WEIGHT * QUANTIZATION_RANGE) for p in survivors]
        entry: dict[str, Any] = {"error_bound": len(weights) * 2 * CLIPPING_RANGE / sum(weights)}
        for mode in MODES:
            entry[mode] = {
                "wall_s_median": statistics.median(walls[mode]),
                "cpu_s_median": statistics.median(cpus[mode]),
                "wall_ratio": statistics.median(walls[mode]) / statistics.median(walls["plain"]),
                "cpu_ratio": statistics.median(cpus[mode]) / statistics.median(cpus["plain"]),
                "wall_s": walls[mode],
                "cpu_s": cpus[mode],
            }
            if mode != "plain":
                keys = breakdowns[mode][0].keys()
                entry[mode]["cpu_breakdown_s_per_round"] = {
                    k: statistics.median(b[k] for b in breakdowns[mode]) for k in keys
                }
                entry[mode]["max_abs_error_vs_plain"] = max(
                    float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(aggregates[mode], aggregates["plain"])
                )
        results[setting.name] = entry
        _print_setting(setting.name, entry)

    primitives = _primitives(deltas[0])
    report = {
        "benchmark": "bench_secagg",
        "vector_size": sum(math.prod(s) for s in SHAPES),
        "rounds_per_run": args.rounds,
        "metric": "round time = one call of the fit workflow; wall = perf_counter, cpu = process_time (all threads)",
        "runs_per_mode": args.repeats,
        "clipping_range": CLIPPING_RANGE,
        "quantization_range": QUANTIZATION_RANGE,
        "max_weight": MAX_WEIGHT,
        "update_norm": UPDATE_NORM,
        "settings": results,
        "primitives_s_per_call": primitives,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_before": load_before,
                    "load_after": os.getloadavg()[0]},
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(RESULT)

    print("primitives, one call on the full vector or one key:")
    for name, seconds in primitives.items():
        print(f"  {name:58s} {seconds * 1e3:8.2f} ms")
    print(f"load average {load_before:.1f} -> {report['machine']['load_after']:.1f}; wrote {RESULT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
