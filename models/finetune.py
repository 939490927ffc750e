"""Which parameters DP-SGD trains: every one ("all"), the classifier only ("head") or the model's last block and its
head ("last"); the rest are frozen (`requires_grad` False) before Opacus wraps the model.

Why: each trainable parameter adds its share of the noise's norm (sigma * C per coordinate, summed over d
coordinates), while the clipped signal stays bounded by C; fine-tuning a small part of a publicly pretrained model
under DP-SGD keeps more of the signal (Tramer & Boneh 2021; De et al. 2022). Frozen parameters get no gradient and
no noise, so they come back bit-identical, and the server's average leaves them as they were.

The parts are found from the model's own interface, the same for every registered model (each has
`forward_features` / `forward_head(x, pre_logits=...)`), by recording which modules a forward pass calls:

- head: the modules `forward_head` calls beyond its `pre_logits` output (the classifier);
- last: everything `forward_head` calls, plus the last block of `forward_features`: the model's `last_block()`
  where it defines one, else the last-called of its top-level blocks (direct children, with the elements of a
  Sequential or ModuleList child taken one by one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

DP_TRAIN_MODES = ("all", "head", "last")


@dataclass(frozen=True)
class ParameterCounts:
    """How many parameter values (not tensors) train under DP-SGD and how many stay frozen."""

    trainable: int
    frozen: int


def dp_trainable_names(model: nn.Module, mode: str, *, input_size: tuple[int, int, int] = (1, 48, 48)) -> set[str]:
    """The names (as `model.named_parameters()` gives them) of the parameters `mode` trains.

    Args:
        model: a registered model (with `forward_features` and `forward_head`).
        mode: one of DP_TRAIN_MODES.
        input_size: (channels, height, width) of one input, to trace a forward pass.

    Raises:
        ValueError: an unknown mode, or a model without `forward_features` / `forward_head`.
    """
    if mode not in DP_TRAIN_MODES:
        raise ValueError(f"dp-train must be one of {', '.join(DP_TRAIN_MODES)}, got {mode!r}")
    if mode == "all":
        return {name for name, _ in model.named_parameters()}
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ValueError(f"{type(model).__name__} has no forward_features / forward_head to find its head in")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model.forward_features(torch.zeros(1, *input_size))
            pre_logits = _called(model, lambda: model.forward_head(features, pre_logits=True))
            head = _called(model, lambda: model.forward_head(features))
            modules = [m for m in head if m not in pre_logits] if mode == "head" else head
            if mode == "last":
                modules = modules + [_last_block(model, input_size)]
    finally:
        model.train(was_training)
    trainable = {id(p) for module in modules for p in module.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in trainable}


def freeze_for_dp(model: nn.Module, mode: str, *, input_size: tuple[int, int, int] = (1, 48, 48)) -> ParameterCounts:
    """Sets `requires_grad` on the parameters `mode` trains and clears it on the others; returns the counts.

    Call it before building the optimiser and before Opacus wraps the model: both keep only the parameters that
    require a gradient, so a frozen one gets neither a per-sample gradient nor noise.
    """
    names = dp_trainable_names(model, mode, input_size=input_size)
    if len(names) < len(list(model.parameters())):
        # Opacus's hooks engine wraps a trainable layer's output in a BackwardHookFunction; when the layer's input
        # needs no gradient (a frozen layer before it) that output is a view, and an in-place ReLU on it raises
        # "Output 0 of BackwardHookFunction is a view and is being modified inplace" (fer_vgg, dp-train "last",
        # reproduced in tests/test_dp_finetune.py). Out-of-place activations compute the same values.
        for module in model.modules():
            if getattr(module, "inplace", False) is True:
                module.inplace = False
    trainable = frozen = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        if name in names:
            trainable += param.numel()
        else:
            frozen += param.numel()
    return ParameterCounts(trainable=trainable, frozen=frozen)


def trainable_mask(model: nn.Module, mode: str, *, input_size: tuple[int, int, int] = (1, 48, 48)) -> torch.Tensor:
    """A boolean per value of `model.state_dict()`, flattened in its order (the layout client.wire sends): True
    where `mode` trains the value. Buffers are never trained. Central DP (privacy/central.py) adds its noise only
    where this is True and keeps the rest of the global model as it was."""
    names = dp_trainable_names(model, mode, input_size=input_size)
    parameters = {name for name, _ in model.named_parameters()}
    return torch.cat([
        torch.full((value.numel(),), name in names and name in parameters, dtype=torch.bool)
        for name, value in model.state_dict().items()
    ])


def _called(model: nn.Module, run: Callable[[], object]) -> list[nn.Module]:
    """The modules owning parameters that `run` calls, in order of first call."""
    order: list[nn.Module] = []
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    handles = [m.register_forward_hook(lambda module, _i, _o: order.append(module) if module not in order else None)
               for m in owners]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return order


def _last_block(model: nn.Module, input_size: tuple[int, int, int]) -> nn.Module:
    """The last block `forward_features` runs (see the module docstring)."""
    if hasattr(model, "last_block"):
        return model.last_block()
    blocks: list[nn.Module] = []
    for child in model.children():
        blocks += list(child.children()) if isinstance(child, (nn.Sequential, nn.ModuleList)) else [child]
    blocks = [b for b in blocks if any(True for _ in b.parameters())]
    order: list[nn.Module] = []
    handles = [b.register_forward_hook(lambda module, _i, _o: order.append(module)) for b in blocks]
    try:
        model.forward_features(torch.zeros(1, *input_size))
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise ValueError(f"{type(model).__name__}.forward_features calls no block with parameters")
    return order[-1]
