"""Parameter and multiply-accumulate counts, the figures papers report as "params" and "FLOPs".

FER papers (DMSNet's included) count multiply-accumulates and call them FLOPs; torch's `FlopCounterMode` counts
2 FLOPs per MAC, so we halve it and always say "MACs". Only convolutions and matrix products are counted (as in
the usual counters, thop/ptflops): normalisation, activations, pooling and the deformable convs' bilinear sampling
are a few percent at most.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass on one (C, H, W) image, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def complexity(name: str, *, input_size: tuple[int, int, int], **cfg: Any) -> dict[str, int]:
    """Parameters and MACs of `create_model(name, in_chans=C, **cfg)` at `input_size`, computed without any
    arithmetic (on the meta device), so even ResNet-50 at 224×224 costs milliseconds."""
    from models._registry import create_model

    with torch.device("meta"):
        model = create_model(name, in_chans=input_size[0], **cfg)
    return {"params": count_params(model), "macs": count_macs(model, input_size)}
