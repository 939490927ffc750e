"""Book-keeping DP-SGD clipping: per-sample clipped gradients from ONE backward pass.

Opacus offers two ways to clip per-sample gradients. ``hooks`` materialises every per-sample gradient (for CNN-AM's
9216x128 classifier that is 1.2 M floats per image), and ``ghost`` avoids that for Linear layers but pays a
second backward pass to form the clipped sum. Book-keeping (Bu et al., "Differentially Private Optimization on
Large Model at Small Cost", ICML 2023) does neither: one backward pass records each layer's input activations
and output gradients, the per-sample norms come from those records (the ghost-norm identity for Linear layers on
flat inputs, Opacus's own per-sample gradient functions for every other layer), and the clipped sum is formed
from the same records with each sample's output gradient scaled by its clipping factor. While the backward pass
runs, the parameters that can be left out of it are (their gradients would be thrown away), so autograd only
propagates activation gradients.

The result is the same vector Opacus's ghost clipping gives, sum_i min(1, C / ||g_i||) g_i (tests pin it against
an explicit per-sample loop); noise, scaling and accounting stay with Opacus's
``DPOptimizerFastGradientClipping`` and the accountant hook, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

__all__ = [
    "BookKeepingLoss",
    "BookKeepingModule",
    "UnrecordedGradientError",
    "release_bookkeeping_hooks",
    "supports_bookkeeping",
]


class UnrecordedGradientError(RuntimeError):
    """A trainable parameter's per-sample contribution was not recorded in this step, so it cannot be clipped.

    Raised instead of leaving autograd's unclipped gradient in ``.grad`` (every ``.grad`` is cleared first): a
    parameter used outside its layer's forward (``F.linear(x, layer.weight)``), hooks removed, or a layer whose
    output never reached the loss. Opacus's hooks mode refuses the same steps ("Per sample gradient is not
    initialized").
    """

# Attribute on the wrapped model that holds the hook handles, so a later round can release them.
_HANDLES_ATTR = "_bookkeeping_hooks"


def _own_parameters(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters(recurse=False) if p.requires_grad]


def _trainable_layers(model: nn.Module) -> list[nn.Module]:
    return [layer for layer in model.modules() if _own_parameters(layer)]


def release_bookkeeping_hooks(model: nn.Module) -> None:
    """Removes the hooks a :class:`BookKeepingModule` left on ``model`` (an earlier round's wrapper)."""
    for handle in getattr(model, _HANDLES_ATTR, ()):
        handle.remove()
    if hasattr(model, _HANDLES_ATTR):
        delattr(model, _HANDLES_ATTR)


def _layers_without_a_rule(model: nn.Module) -> list[str]:
    """Names of the trainable layer types Opacus has no per-sample gradient function for (Linear has one)."""
    return sorted({type(layer).__name__ for layer in _trainable_layers(model)
                   if type(layer) not in GradSampleModule.GRAD_SAMPLERS})


def supports_bookkeeping(model: nn.Module) -> bool:
    """Whether every layer holding trainable parameters has a per-sample rule (an Opacus grad sampler)."""
    return not _layers_without_a_rule(model)


@dataclass
class _Record:
    """One call of a layer in the current step: its input and, once backward has run, its output gradient."""

    activation: torch.Tensor
    backprop: torch.Tensor | None = None


@dataclass
class _LayerState:
    records: list[_Record] = field(default_factory=list)


class BookKeepingModule(nn.Module):
    """Wraps a model so that :meth:`clip_backward` computes clipped per-sample gradient sums in one backward pass.

    Args:
        module: The model (no BatchNorm: every sample's gradient must depend on that sample only).
        max_grad_norm: The per-sample clipping norm C.
        views: Augmentation multiplicity K (De et al. 2022, "Unlocking high-accuracy differentially private image
            classification through scale"): the batch holds K consecutive augmented views of each sample (rows
            b*K .. b*K+K-1 are sample b), and a sample's gradient is the MEAN of its views' gradients, clipped as
            one. The clipping bound, and so the sensitivity the accountant assumes, stay those of one sample; the
            K views only lower the variance of what is clipped.
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float, views: int = 1) -> None:
        super().__init__()
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be a positive integer, got {views!r}")
        unsupported = _layers_without_a_rule(module)
        if unsupported:
            raise ValueError(f"book-keeping clipping has no per-sample rule for: {', '.join(unsupported)}")
        release_bookkeeping_hooks(module)
        self._module = module
        self.max_grad_norm = float(max_grad_norm)
        self.views = views
        self.per_sample_gradient_norms: torch.Tensor | None = None
        self._layers = {layer: _LayerState() for layer in _trainable_layers(module)}
        self._frozen: list[nn.Parameter] = []
        self._handles = []
        for layer in self._layers:
            self._handles.append(layer.register_forward_pre_hook(self._before_layer))
            self._handles.append(layer.register_forward_hook(self._after_layer))
        object.__setattr__(module, _HANDLES_ATTR, self._handles)

    @property
    def wrapped(self) -> nn.Module:
        """The model this wraps (what to save and send)."""
        return self._module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # A forward pass whose loss was never backpropagated must not leave parameters out of the next one.
        self._thaw()
        for state in self._layers.values():
            state.records.clear()
        try:
            return self._module(*args, **kwargs)
        except BaseException:
            self._thaw()
            raise

    def remove_hooks(self) -> None:
        """Detaches the hooks, leaving the wrapped model as it was."""
        self._thaw()
        release_bookkeeping_hooks(self._module)

    def _recording(self, layer: nn.Module) -> bool:
        return layer.training and torch.is_grad_enabled()

    def _before_layer(self, layer: nn.Module, inputs: tuple) -> None:
        if not self._recording(layer):
            return
        # Every recorded layer gets its output gradient without its own parameters taking part in backward.
        for param in _own_parameters(layer):
            param.requires_grad_(False)
            self._frozen.append(param)

    def _after_layer(self, layer: nn.Module, inputs: tuple, output: Any) -> torch.Tensor | None:
        if not self._recording(layer):
            return None
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"book-keeping clipping needs a tensor output from {type(layer).__name__}")
        replaced = None
        if not output.requires_grad:
            # A first layer (fed by the data): with its parameters out of the pass nothing upstream needs a
            # gradient, so its output becomes the leaf the backward pass stops at; autograd no longer computes
            # this layer's weight gradient only to have it replaced by the clipped sum.
            output = replaced = output.detach().requires_grad_(True)
        record = _Record(activation=inputs[0].detach())
        self._layers[layer].records.append(record)

        def keep(grad: torch.Tensor, record: _Record = record) -> None:
            record.backprop = grad.detach()

        output.register_hook(keep)
        return replaced

    def _thaw(self) -> None:
        for param in self._frozen:
            param.requires_grad_(True)
        self._frozen.clear()

    def clip_backward(self, loss_per_sample: torch.Tensor) -> torch.Tensor:
        """Backpropagates ``loss_per_sample`` once and sets each parameter's ``.grad`` to the clipped sum.

        Args:
            loss_per_sample: Shape (B*K,), the per-row losses of the last forward pass (K = ``views``).

        Returns:
            The per-sample gradient norms before clipping (of the mean over a sample's views), shape (B,).
        """
        try:
            if loss_per_sample.requires_grad:
                loss_per_sample.sum().backward()
        finally:
            self._thaw()
        rows = loss_per_sample.shape[0]
        if rows % self.views:
            self._discard_step()
            raise ValueError(f"book-keeping clipping: {rows} rows are not whole groups of {self.views} views; "
                             "refusing to clip a mixed batch")
        batch = rows // self.views
        if batch == 0:
            # An empty Poisson batch: the clipped sum is zero (Opacus's samplers mis-shape empty inputs).
            for layer, state in self._layers.items():
                state.records.clear()
                for param in _own_parameters(layer):
                    param.grad = torch.zeros_like(param)
            self.per_sample_gradient_norms = loss_per_sample.new_zeros(0).detach()
            return self.per_sample_gradient_norms
        norms_sq = loss_per_sample.new_zeros(batch)
        pending: list[tuple[nn.Module, list[_Record], dict[nn.Parameter, torch.Tensor] | None]] = []
        unrecorded: list[str] = []
        for layer, state in self._layers.items():
            records = [r for r in state.records if r.backprop is not None]
            if not records:
                # Fail closed: autograd may have put this layer's *unclipped* gradient in .grad (reproduced: a
                # Linear weight used through F.linear left a gradient of norm 90 under a clip of 0.08).
                if _own_parameters(layer):
                    unrecorded.append(type(layer).__name__)
                continue
            if type(layer) is nn.Linear and len(records) == 1 and records[0].activation.dim() == 2:
                norms_sq += _linear_flat_norm_sq(layer, records[0], self.views)
                pending.append((layer, records, None))
            else:
                per_sample = _per_sample_gradients(layer, records)
                if self.views > 1:
                    # A sample's gradient is the mean over its views: the mean of each (B, K, ...) group.
                    per_sample = {param: grad.reshape(batch, self.views, *grad.shape[1:]).mean(1)
                                  for param, grad in per_sample.items()}
                for grad in per_sample.values():
                    norms_sq += grad.reshape(batch, -1).pow(2).sum(1)
                pending.append((layer, records, per_sample))
        if unrecorded:
            self._fail_closed(unrecorded)
        norms = norms_sq.sqrt()
        coefficients = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for layer, records, per_sample in pending:
            if per_sample is None:
                _linear_flat_clipped_sum(layer, records[0], coefficients, self.views)
            else:
                for param, grad in per_sample.items():
                    # One matrix-vector product over the batch (einsum went through bmm with copies).
                    clipped = coefficients.to(grad.dtype) @ grad.reshape(batch, -1)
                    param.grad = clipped.view(param.shape).to(param.dtype)
        for state in self._layers.values():
            state.records.clear()
        self.per_sample_gradient_norms = norms.detach()
        return self.per_sample_gradient_norms


    def _discard_step(self) -> None:
        """Drops this step's records, gradients and norms, so a refused step leaves nothing to apply."""
        for state in self._layers.values():
            state.records.clear()
        for param in self._module.parameters():
            param.grad = None
        self.per_sample_gradient_norms = None

    def _fail_closed(self, unrecorded: list[str]) -> None:
        self._discard_step()
        raise UnrecordedGradientError(
            f"no per-sample contribution was recorded for trainable layer(s) {', '.join(sorted(set(unrecorded)))} "
            "in this step (a parameter used outside its layer's forward, hooks removed, or an output that never "
            "reached the loss); refusing to leave an unclipped gradient"
        )


def _linear_flat_norm_sq(layer: nn.Linear, record: _Record, views: int = 1) -> torch.Tensor:
    """||g_i a_i^T||^2 = ||a_i||^2 ||g_i||^2 for a Linear layer on flat inputs (the ghost-norm identity).

    With K views per sample the gradient is (1/K) sum_k g_ik a_ik^T, whose squared norm is
    (1/K^2) sum_{k,l} (a_ik . a_il)(g_ik . g_il): two K x K Gram matrices per sample, so CNN-AM's 9216x128 layer
    still never materialises a per-sample gradient (materialising it made aug-mult 2 rounds 7x slower).
    """
    if views > 1:
        batch = record.backprop.shape[0] // views
        grads = record.backprop.reshape(batch, views, -1)
        total = torch.zeros(batch, dtype=grads.dtype, device=grads.device)
        if layer.weight.requires_grad:
            acts = record.activation.to(grads.dtype).reshape(batch, views, -1)
            total = total + (acts @ acts.transpose(1, 2) * (grads @ grads.transpose(1, 2))).sum((1, 2)) / views**2
        if layer.bias is not None and layer.bias.requires_grad:
            total = total + grads.mean(1).pow(2).sum(1)
        return total
    grad_sq = record.backprop.pow(2).sum(1)
    total = record.activation.pow(2).sum(1) * grad_sq if layer.weight.requires_grad else torch.zeros_like(grad_sq)
    if layer.bias is not None and layer.bias.requires_grad:
        total = total + grad_sq
    return total


def _linear_flat_clipped_sum(layer: nn.Linear, record: _Record, coefficients: torch.Tensor, views: int = 1) -> None:
    # Row b*K + k carries sample b's coefficient over K: the clipped sum of the view means.
    scale = coefficients.repeat_interleave(views) / views if views > 1 else coefficients
    scaled = record.backprop * scale.unsqueeze(1)
    if layer.weight.requires_grad:
        layer.weight.grad = scaled.t().mm(record.activation.to(scaled.dtype))
    if layer.bias is not None and layer.bias.requires_grad:
        layer.bias.grad = scaled.sum(0)


def _conv2d_per_sample(layer: nn.Conv2d, activations: list[torch.Tensor],
                       backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample Conv2d gradients as the weight gradient of ONE grouped convolution, the batch folded into groups.

    Sample b's weight gradient is the weight gradient of the convolution of its own input with its own output
    gradient, so stacking the batch as B groups of channels (input (1, B*C_in, H, W), output gradient
    (1, B*C_out, H', W'), weight (B*C_out, C_in/g, k, k), groups B*g) gives all of them in one oneDNN call.
    Opacus's rule unfolds the input (im2col, 42 MB per step for CNN-AM's second conv at batch 64) and runs a
    batched matmul of 64x576 by 576x288 blocks; measured on this 2-core CPU, one thread: 66 ms against 24 ms for
    that layer (8.2 against 2.6 ms for the first conv). Same values (tests pin both against a one-sample loop).
    """
    activation = activations[0].to(backprops.dtype)
    batch = activation.shape[0]
    out: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight.requires_grad:
        c_in, h, w = activation.shape[1:]
        c_out, h_out, w_out = backprops.shape[1:]
        weight_shape = [batch * c_out, *layer.weight.shape[1:]]
        _, grad, _ = torch.ops.aten.convolution_backward(
            backprops.reshape(1, batch * c_out, h_out, w_out).contiguous(),
            activation.reshape(1, batch * c_in, h, w).contiguous(),
            backprops.new_empty(weight_shape),  # only its shape is read: the input gradient is not asked for
            None, list(layer.stride), list(layer.padding), list(layer.dilation), False, [0, 0],
            batch * layer.groups, [False, True, False],
        )
        out[layer.weight] = grad.view(batch, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum((2, 3))
    return out


def _grouped_conv_applies(layer: nn.Module, backprops: torch.Tensor) -> bool:
    """Whether :func:`_conv2d_per_sample` beats Opacus's rule for this call (both give the same values).

    Timed per layer of CNN-AM and DMSNet-IoT at batch 64, one thread (grouped / Opacus, ms): 3x3 convs at 48x48
    1.8 / 1.9, 24x24 2.0 / 5.9, 12x12 2.1 / 4.9; depthwise 3x3 at 12x12 0.19 / 2.3 and at 2x2 0.25 / 0.37; but
    3x3 at 6x6 with 64->128 channels 19.7 / 11.0, at 3x3 with 128->128 36.8 / 19.0, 1x1 convs 0.3 / 0.2 and
    grouped 1x1 convs 2.9 / 0.1. So: kernels wider than 1x1, with at least 100 output positions or groups.
    """
    if type(layer) is not nn.Conv2d or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return False
    positions = backprops.shape[-1] * backprops.shape[-2]
    return max(layer.kernel_size) > 1 and (positions >= 100 or layer.groups > 1)


def _per_sample_gradients(layer: nn.Module, records: list[_Record]) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of one layer, summed over its calls in the step (Opacus's registered functions, or
    the grouped-convolution rule where it is faster)."""
    sampler: Callable = _conv2d_per_sample if _grouped_conv_applies(layer, records[0].backprop) \
        else GradSampleModule.GRAD_SAMPLERS[type(layer)]
    total: dict[nn.Parameter, torch.Tensor] = {}
    for record in records:
        for param, grad in sampler(layer, [record.activation], record.backprop).items():
            total[param] = grad if param not in total else total[param] + grad
    return total


class BookKeepingLoss:
    """Criterion wrapper: ``criterion(logits, labels).backward()`` runs book-keeping clipping.

    Mirrors Opacus's ``DPLossFastGradientClipping`` so the training loop stays the same for every engine: the
    returned object has ``backward()``, ``detach()`` and ``item()``; the reported loss is the batch mean.
    """

    def __init__(self, module: BookKeepingModule, criterion: nn.Module) -> None:
        self.module = module
        self.criterion = criterion

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> _BookKeepingTensor:
        reduction = getattr(self.criterion, "reduction", "mean")
        self.criterion.reduction = "none"
        try:
            loss_per_sample = self.criterion(logits, labels)
        finally:
            self.criterion.reduction = reduction
        return _BookKeepingTensor(self.module, loss_per_sample)


class _BookKeepingTensor:
    def __init__(self, module: BookKeepingModule, loss_per_sample: torch.Tensor) -> None:
        self.module = module
        self.loss_per_sample = loss_per_sample

    def detach(self) -> torch.Tensor:
        if self.loss_per_sample.numel() == 0:
            return self.loss_per_sample.new_zeros(())
        return self.loss_per_sample.detach().mean()

    def item(self) -> float:
        return float(self.detach())

    def __float__(self) -> float:
        return self.item()

    def backward(self) -> None:
        self.module.clip_backward(self.loss_per_sample)
