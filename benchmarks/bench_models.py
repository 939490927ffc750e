"""How fast each registered model runs on this CPU: inference, plain training and DP-SGD training under each
Opacus engine, and the DP/plain ratio that decides what a home hub can afford.

Per model (default size, DP build = GroupNorm, random 48×48 grayscale input):
- inference images/s at batch 1 and 64 (eval mode, no autograd);
- training images/s of one SGD step (forward, cross-entropy, backward, step): plain PyTorch, and under Opacus
  `PrivacyEngine.make_private` with grad_sample_mode "hooks" (Opacus's default and the client's), "functorch",
  "ghost" (ghost clipping: per-sample gradient norms without per-sample gradients where Opacus knows how: Linear)
  and "ew" (torch's ExpandedWeights); and "bk", our book-keeping clipping (privacy/bookkeeping.py: one backward
  pass, clipped sum formed from the recorded activations and output gradients) with Opacus's ghost-clipping
  optimizer adding the noise from torch's (seedable) generator, and "bk-secure", the same with the noise drawn
  from the OS-keyed CSPRNG a deployed node uses (privacy.noise `_SecureRandom`). DP/plain is the throughput ratio,
  1.0 meaning DP is free; secure_vs_seeded times single bk and bk-secure steps back to back (the CSPRNG's cost under
  the same load; see bench_secure_pairs); noise_ms_per_step times the two generators alone, back to back.
Training engines are timed in turns (each engine once per turn, 3 turns, median), so a slow spell of the shared
machine hits every engine alike; each timing is the median over repetitions after warm-up. The load average is
recorded, because on a shared 2-core machine other processes' work shows up as slower figures.

DMSNet-heavy trains at batch 16 (its per-sample gradients at batch 64 would take ~6 GB); everything else at 64.

Usage: .venv/bin/python benchmarks/bench_models.py [--models cnn_am,dmsnet_iot] [--modes hooks,ghost] [--quick]
Prints a table and writes benchmarks/results/bench_models.json (to a temp file first, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models import complexity, create_model, list_models  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "bench_models.json"
DP_MODES = ("hooks", "functorch", "ghost", "ew", "bk", "bk-secure")
TRAIN_BATCH = {"dmsnet_heavy": 16}
INFER_BATCHES = (1, 64)


def _timed(step, *, warmup: int, min_reps: int, min_seconds: float) -> float:
    """Median seconds per call of `step` after `warmup` calls, over at least `min_reps` calls and `min_seconds`."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - started < min_seconds:
        tick = time.perf_counter()
        step()
        times.append(time.perf_counter() - tick)
        if len(times) >= 4 * min_reps:
            break
    return statistics.median(times)


def _batch(size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 1, 48, 48, generator=generator), torch.randint(0, 7, (size,), generator=generator)


def bench_inference(name: str, *, timing: dict) -> dict[str, float]:
    model = create_model(name, dp=True).eval()
    out = {}
    for batch in INFER_BATCHES:
        images, _ = _batch(batch)

        def step(model=model, images=images):
            with torch.inference_mode():
                model(images)

        out[f"b{batch}"] = batch / _timed(step, **timing)
    return out


def make_train_step(name: str, mode: str | None, *, batch: int):
    """One SGD step (forward, loss, backward, step) as a callable; `mode` None is plain PyTorch, "bk" our
    book-keeping clipping, anything else an Opacus grad_sample_mode."""
    torch.manual_seed(0)
    model = create_model(name, dp=True).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion: nn.Module = nn.CrossEntropyLoss()
    images, labels = _batch(batch)
    if mode in ("bk", "bk-secure"):
        from opacus.optimizers import DPOptimizerFastGradientClipping

        from privacy.bookkeeping import BookKeepingLoss, BookKeepingModule
        from privacy.noise import _secure_optimizer_class, _SecureRandom

        model = BookKeepingModule(model, max_grad_norm=1.0)
        criterion = BookKeepingLoss(model, criterion)
        # bk-secure: what a deployed node runs (privacy.dp DPSettings(secure_mode=True)): the noise comes from
        # ChaCha20 keyed by the OS, each value the sum of four Gaussians over two; bk draws from torch's generator.
        secure = mode == "bk-secure"
        optimizer_class = _secure_optimizer_class(DPOptimizerFastGradientClipping) if secure \
            else DPOptimizerFastGradientClipping
        optimizer = optimizer_class(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch)
        if secure:
            optimizer.secure_random = _SecureRandom()
    elif mode is not None:
        from opacus import PrivacyEngine

        loader = DataLoader(TensorDataset(images, labels), batch_size=batch)
        engine = PrivacyEngine(accountant="rdp")
        kwargs = {"criterion": criterion} if mode == "ghost" else {}
        private = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode=mode, **kwargs,
        )
        model, optimizer = private[0], private[1]
        if mode == "ghost":
            criterion = private[2]

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()

    return step


def bench_train(
    name: str, modes: list[str | None], *, batch: int, timing: dict, rounds: int
) -> tuple[dict, dict, dict]:
    """Images/s of each engine's SGD steps, timed in turns so that a slow spell of the shared machine hits every
    engine alike: `rounds` turns, each engine timed once per turn, median over the turns.

    Returns the median images/s by engine ("plain" for None), the errors of engines that cannot train this model,
    and each engine's images/s per turn.
    """
    steps, errors = {}, {}
    for mode in modes:
        key = mode or "plain"
        try:
            steps[key] = make_train_step(name, mode, batch=batch)
            steps[key]()  # an engine that fails, fails here
        except Exception as err:  # noqa: BLE001 - an engine that cannot run this model is a result too
            steps.pop(key, None)
            errors[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    per_turn: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            per_turn[key].append(batch / _timed(step, **timing))
    medians = {key: statistics.median(values) for key, values in per_turn.items()}
    return medians, errors, per_turn


def bench_secure_pairs(name: str, *, batch: int, pairs: int) -> dict[str, float]:
    """The CSPRNG's cost inside a DP step, as close to "the same moment" as a shared machine allows: one bk step and
    one bk-secure step back to back (order alternating), `pairs` times; the median of each pair's ratio.

    Turns of 2 s per engine (bench_train) are too coarse here: other work on the machine comes and goes within
    seconds (measured per-turn ratios of 0.92, 0.46 and 0.69 in one run), while single steps alternate in ~0.3 s.
    """
    seeded, secure = make_train_step(name, "bk", batch=batch), make_train_step(name, "bk-secure", batch=batch)
    for step in (seeded, secure, seeded, secure):
        step()
    times: dict[str, list[float]] = {"bk": [], "bk-secure": []}
    for index in range(pairs):
        order = (("bk", seeded), ("bk-secure", secure))
        for key, step in order if index % 2 == 0 else reversed(order):
            tick = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - tick)
    ratios = [b / s for b, s in zip(times["bk"], times["bk-secure"])]
    return {
        "bk_ms": 1000 * statistics.median(times["bk"]),
        "bk_secure_ms": 1000 * statistics.median(times["bk-secure"]),
        "secure_over_seeded": statistics.median(ratios),
        "pairs": pairs,
    }


def bench_cpu_time(name: str, modes: list[str], *, batch: int, turns: int) -> dict[str, float]:
    """DP/plain from the CPU time each step's thread used, engines interleaved step by step.

    Wall-clock turns swing with every other process on a shared 2-core machine (plain CNN-AM read 1141-1633
    images/s in three quiet runs); the CPU time a thread spends on its own step barely moves with the scheduler.
    Meaningful with one torch thread (`--threads 1`, how a deployed ClientApp trains): with more, the other
    threads' work is not in this thread's clock. Cache and memory-bandwidth contention still show.
    """
    steps = {mode: make_train_step(name, None if mode == "plain" else mode, batch=batch)
             for mode in ["plain", *modes]}
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    for _ in range(turns):
        for mode, step in steps.items():
            tick = time.thread_time()
            step()
            times[mode].append(time.thread_time() - tick)
    ms = {mode: 1000 * statistics.median(values) for mode, values in times.items()}
    return {"threads": torch.get_num_threads(), "turns": turns, "step_ms": ms,
            "dp_over_plain": {mode: ms["plain"] / ms[mode] for mode in modes}}


def bench_noise(count: int, *, timing: dict) -> dict[str, float]:
    """Milliseconds to draw one step's noise for `count` parameters, back to back: torch's seeded generator (one
    Gaussian per value, Opacus without secure_mode) and the OS-keyed CSPRNG a deployed node uses (privacy.noise)."""
    from privacy.noise import _SecureRandom

    reference, secure = torch.zeros(count), _SecureRandom()
    return {
        "seeded": 1000 * _timed(lambda: torch.normal(0.0, 1.0, size=reference.shape), **timing),
        "csprng": 1000 * _timed(lambda: secure.gaussian_like(reference, std=1.0), **timing),
    }


def run(models: list[str], modes: list[str], *, quick: bool) -> dict:
    timing = {"warmup": 1 if quick else 2, "min_reps": 2 if quick else 3, "min_seconds": 0.5 if quick else 2.0}
    turns = 1 if quick else 3
    load_at_start = _load_average()
    rows = []
    for name in models:
        started = time.perf_counter()
        cost = complexity(name, input_size=(1, 48, 48))
        batch = TRAIN_BATCH.get(name, 64)
        row = {
            "model": name, "params": cost["params"], "macs_48": cost["macs"], "train_batch": batch,
            "infer_images_per_s": bench_inference(name, timing=timing),
        }
        row["train_images_per_s"], row["errors"], per_turn = bench_train(name, [None, *modes], batch=batch,
                                                                        timing=timing, rounds=turns)
        plain = row["train_images_per_s"]["plain"]
        row["dp_over_plain"] = {m: v / plain for m, v in row["train_images_per_s"].items() if m != "plain"}
        if row["dp_over_plain"]:
            row["best_dp_mode"] = max(row["dp_over_plain"], key=row["dp_over_plain"].get)
        if "bk" in per_turn and "bk-secure" in per_turn:
            row["secure_vs_seeded"] = bench_secure_pairs(name, batch=batch, pairs=4 if quick else 20)
        cpu_modes = [m for m in ("bk", "bk-secure") if m in per_turn]
        if cpu_modes and torch.get_num_threads() == 1:
            row["cpu_time"] = bench_cpu_time(name, cpu_modes, batch=batch, turns=5 if quick else 30)
        row["noise_ms_per_step"] = bench_noise(row["params"], timing=timing)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        _print_row(row, modes)
    return {
        "benchmark": "bench_models",
        "unit": "images/s (higher is better); dp_over_plain = DP images/s ÷ plain images/s",
        "input": "random (B, 1, 48, 48) float32, 7 classes; DP build (GroupNorm) for every column",
        "machine": {
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_at_start": load_at_start,
        },
        "quick": quick,
        "models": rows,
        "load_average_at_end": _load_average(),
    }


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


_HEADER_DONE = False


def _print_row(row: dict, modes: list[str]) -> None:
    global _HEADER_DONE
    if not _HEADER_DONE:
        cols = ["model", "params", "MMACs", "inf b1", "inf b64", "plain"] + modes + ["best DP/plain"]
        print("  ".join(f"{c:>13}" for c in cols))
        _HEADER_DONE = True
    train = row["train_images_per_s"]
    infer = row["infer_images_per_s"]
    cells = [row["model"], f"{row['params'] / 1e6:.2f}M", f"{row['macs_48'] / 1e6:.1f}",
             f"{infer['b1']:.0f}", f"{infer['b64']:.0f}", f"{train['plain']:.0f}"]
    cells += [f"{train[m]:.0f}" if m in train else "fails" for m in modes]
    best = row.get("best_dp_mode")
    cells.append(f"{row['dp_over_plain'][best]:.2f} ({best})" if best else "-")
    print("  ".join(f"{c:>13}" for c in cells), flush=True)
    noise = row["noise_ms_per_step"]
    pair = row.get("secure_vs_seeded")
    secure = (f"; steps back to back: bk {pair['bk_ms']:.0f} ms, bk-secure {pair['bk_secure_ms']:.0f} ms, "
              f"bk-secure/bk {pair['secure_over_seeded']:.2f}") if pair else ""
    print(f"{'':>13}  noise per step: seeded {noise['seeded']:.1f} ms, csprng {noise['csprng']:.1f} ms{secure}",
          flush=True)
    cpu = row.get("cpu_time")
    if cpu:
        ratios = ", ".join(f"{m} {v:.2f}" for m, v in cpu["dp_over_plain"].items())
        steps = ", ".join(f"{m} {v:.0f} ms" for m, v in cpu["step_ms"].items())
        print(f"{'':>13}  thread CPU time per step ({cpu['turns']} interleaved): {steps}; DP/plain {ratios}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(list_models()), help="comma-separated registered names")
    parser.add_argument("--modes", default=",".join(DP_MODES), help="comma-separated Opacus grad_sample_modes")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, noisier figures)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # Opacus warns about secure RNG and optimizer state; not news here
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(list_models())}")
    result = run(models, [m for m in args.modes.split(",") if m], quick=args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=args.out.parent, suffix=".tmp", delete=False) as handle:
        json.dump(result, handle, indent=2)
    os.replace(handle.name, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
