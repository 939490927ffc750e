"""Book-keeping clipping (privacy.bookkeeping): the clipped per-sample gradient sum, against an explicit per-sample
loop and against Opacus's ghost clipping, for every registered model; plus what it must leave untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from models import create_model, list_models
from privacy.bookkeeping import BookKeepingLoss, BookKeepingModule, supports_bookkeeping
from tests.model_builds import SMALL_CFG

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_CLASSES = 5


def _make_model(name: str = "cnn_am", *, seed: int = 0) -> nn.Module:
    """A float64 DP build without dropout (micro-batches would draw other dropout masks)."""
    torch.manual_seed(seed)
    return create_model(name, num_classes=NUM_CLASSES, dp=True, drop_rate=0.0, **SMALL_CFG[name]).double().train()


def _make_batch(size: int = 4, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 1, 48, 48, generator=generator, dtype=torch.float64)
    return images, torch.randint(0, NUM_CLASSES, (size,), generator=generator)


def _per_sample_reference(model: nn.Module, images, labels, *, max_grad_norm: float, views: int = 1):
    """Clipped sum and norms from one sample at a time: the definition, computed independently. With `views` K,
    rows b*K .. b*K+K-1 are sample b and its gradient is the mean of theirs (augmentation multiplicity)."""
    norms, total = [], [torch.zeros_like(p) for p in model.parameters()]
    for b in range(len(labels) // views):
        rows = slice(b * views, (b + 1) * views)
        model.zero_grad(set_to_none=True)
        (nn.functional.cross_entropy(model(images[rows]), labels[rows], reduction="sum") / views).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for acc, grad in zip(total, grads):
            acc.add_(factor * grad)
    model.zero_grad(set_to_none=True)
    return total, torch.stack(norms)


def _bookkeeping_step(model: nn.Module, images, labels, *, max_grad_norm: float) -> BookKeepingModule:
    wrapped = BookKeepingModule(model, max_grad_norm=max_grad_norm)
    BookKeepingLoss(wrapped, nn.CrossEntropyLoss())(wrapped(images), labels).backward()
    return wrapped


def _assert_bookkeeping_matches_the_loop(model: nn.Module) -> None:
    """One book-keeping step against the one-sample loop, with C between the smallest and largest norm, so some
    samples are clipped and some are not: norms and every parameter's clipped sum to float64 precision."""
    images, labels = _make_batch()
    _, norms = _per_sample_reference(model, images, labels, max_grad_norm=1.0)
    max_grad_norm = float(norms.median())
    expected, expected_norms = _per_sample_reference(model, images, labels, max_grad_norm=max_grad_norm)
    wrapped = _bookkeeping_step(model, images, labels, max_grad_norm=max_grad_norm)
    torch.testing.assert_close(wrapped.per_sample_gradient_norms, expected_norms, rtol=1e-9, atol=1e-12)
    for param, want in zip(model.parameters(), expected):
        torch.testing.assert_close(param.grad, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", list_models())
def test_clipped_sum_equals_the_per_sample_loop(name):
    """For every registered model the book-kept gradient is sum_i min(1, C/||g_i||) g_i, to float64 precision."""
    # Prepare
    model = _make_model(name)

    # Execute, Assert
    assert supports_bookkeeping(model)
    _assert_bookkeeping_matches_the_loop(model)


def _make_conv_net(conv: nn.Conv2d) -> nn.Module:
    """A conv under test, then pooling and a classifier, in float64."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), conv, nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(conv.out_channels * 4, NUM_CLASSES)).double().train()


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
    nn.Conv2d(4, 6, (3, 5), padding=(2, 1), dilation=2),
    nn.Conv2d(4, 8, 3, padding=1, groups=2),
    nn.Conv2d(4, 4, 3, padding=1, groups=4),
    nn.Conv2d(4, 6, 1),
], ids=["3x3", "stride2-nobias", "rect-dilated", "groups2", "depthwise", "1x1"])
def test_conv_rule_equals_the_per_sample_loop(conv):
    """The grouped-convolution rule for Conv2d gives each sample's gradient for strides, dilation and groups."""
    # Prepare
    model = _make_conv_net(conv)

    # Execute, Assert
    _assert_bookkeeping_matches_the_loop(model)


def test_clipped_sum_equals_opacus_ghost_clipping():
    """CNN-AM: the same clipped sum Opacus's ghost clipping hands its optimizer (an independent implementation)."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    # Prepare
    images, labels = _make_batch(6, seed=1)
    ours, theirs = _make_model(seed=3), _make_model(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns that secure_mode is off
        ghost = GradSampleModuleFastGradientClipping(theirs, max_grad_norm=0.5, use_ghost_clipping=True,
                                                     loss_reduction="mean")
        optimizer = DPOptimizerFastGradientClipping(torch.optim.SGD(theirs.parameters(), lr=0.1),
                                                    noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=6)
        criterion = DPLossFastGradientClipping(ghost, optimizer, nn.CrossEntropyLoss(), "mean")

        # Execute
        criterion(ghost(images), labels).backward()
        _bookkeeping_step(ours, images, labels, max_grad_norm=0.5)

    # Assert
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-7, atol=1e-12)


def test_parameters_take_part_in_backward_again_after_each_step():
    """Parameters left out of the backward pass are handed back: after a step, after a forward without backward,
    and after a forward that raised."""
    # Prepare
    model = _make_model()
    images, labels = _make_batch()
    wrapped = BookKeepingModule(model, max_grad_norm=1.0)
    loss = BookKeepingLoss(wrapped, nn.CrossEntropyLoss())

    # Execute / Assert: a full step
    loss(wrapped(images), labels).backward()
    assert all(p.requires_grad for p in model.parameters())
    # a forward pass never backpropagated, then the next forward pass
    wrapped(images)
    assert not all(p.requires_grad for p in model.parameters())
    wrapped(images[:2])
    wrapped.remove_hooks()
    assert all(p.requires_grad for p in model.parameters())
    # a forward pass that raises (CNN-AM refuses another input size)
    wrapped = BookKeepingModule(model, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="built for 48"):
        wrapped(torch.randn(2, 1, 40, 40, dtype=torch.float64))
    assert all(p.requires_grad for p in model.parameters())


def test_empty_batch_gives_zero_gradients():
    """A Poisson batch can be empty: every gradient is then exactly zero (the optimizer still adds its noise)."""
    # Prepare
    model = _make_model()
    images, labels = _make_batch()

    # Execute
    _bookkeeping_step(model, images[:0], labels[:0], max_grad_norm=1.0)

    # Assert
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_eval_mode_and_no_grad_record_nothing():
    """Evaluation passes leave no records behind and freeze no parameter."""
    # Prepare
    model = _make_model()
    wrapped = BookKeepingModule(model, max_grad_norm=1.0)
    images, _ = _make_batch()

    # Execute
    with torch.no_grad():
        wrapped(images)
    wrapped.eval()
    wrapped(images)

    # Assert
    assert all(not state.records for state in wrapped._layers.values())
    assert all(p.requires_grad for p in model.parameters())


def test_layer_without_a_per_sample_rule_is_refused():
    """A trainable layer type with neither a Linear rule nor an Opacus grad sampler is named in a ValueError."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.gain

    # Prepare
    model = nn.Sequential(nn.Linear(4, 4), Scale())

    # Execute / Assert
    assert not supports_bookkeeping(model)
    with pytest.raises(ValueError, match="no per-sample rule for: Scale"):
        BookKeepingModule(model, max_grad_norm=1.0)


@pytest.mark.parametrize("name", list_models())
def test_each_models_dp_engine_is_one_the_client_can_open(name):
    """The engine a model's registry entry names is a known one, and bk only where every layer has a rule."""
    from models import model_info
    from privacy.dp import GRAD_SAMPLE_MODES

    # Prepare / Execute
    engine = model_info(name)["dp_engine"]

    # Assert
    assert engine in GRAD_SAMPLE_MODES
    if engine == "bk":
        assert supports_bookkeeping(_make_model(name))


class _SideUse(nn.Module):
    """A model whose head's weight is also used through F.linear, outside the head's own (hooked) forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.relu(self.body(x)), self.head.weight, self.head.bias)


def _make_side_use_step(*, remove_hooks: bool):
    """A private optimizer over `_SideUse` (or a normal MLP with its hooks removed) and a large-gradient batch."""
    from opacus.optimizers import DPOptimizerFastGradientClipping

    torch.manual_seed(0)
    model = _SideUse() if not remove_hooks else nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    wrapped = BookKeepingModule(model, max_grad_norm=0.08)
    if remove_hooks:
        wrapped.remove_hooks()
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.08, expected_batch_size=4
    )
    images = 100.0 * torch.randn(4, 8)
    return model, wrapped, optimizer, images, torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("remove_hooks", [False, True], ids=["param-used-outside-its-layer", "hooks-removed"])
def test_an_unrecorded_parameter_fails_closed_and_nothing_steps(remove_hooks):
    """Attack: a parameter whose per-sample contribution was not recorded raises; no unclipped .grad, no step."""
    # Prepare
    model, wrapped, optimizer, images, labels = _make_side_use_step(remove_hooks=remove_hooks)
    before = [p.detach().clone() for p in model.parameters()]

    # Execute
    with pytest.raises(RuntimeError, match="no per-sample contribution was recorded"):
        optimizer.zero_grad(set_to_none=True)
        BookKeepingLoss(wrapped, nn.CrossEntropyLoss())(wrapped(images), labels).backward()
        optimizer.step()

    # Assert: the unclipped autograd gradient (norm far above the 0.08 clip) is not left behind, and nothing moved
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- augmentation multiplicity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_models())
def test_augmentation_multiplicity_clips_the_mean_of_each_samples_views(name):
    """With K views per sample the clipped sum is sum_b min(1, C/||mean_k g_bk||) mean_k g_bk, and every
    sample's clipped contribution stays within C (the accountant's sensitivity), for every registered model."""
    # Prepare: 3 samples x 2 views; C at the median norm of the view means so some are clipped and some are not
    views = 2
    model = _make_model(name)
    images, _ = _make_batch(6)
    labels = torch.tensor([1, 1, 3, 3, 0, 0])
    _, norms = _per_sample_reference(model, images, labels, views=views, max_grad_norm=1.0)
    max_grad_norm = float(norms.median())
    expected, expected_norms = _per_sample_reference(model, images, labels, views=views,
                                                             max_grad_norm=max_grad_norm)

    # Execute
    wrapped = BookKeepingModule(model, max_grad_norm=max_grad_norm, views=views)
    BookKeepingLoss(wrapped, nn.CrossEntropyLoss())(wrapped(images), labels).backward()

    # Assert
    torch.testing.assert_close(wrapped.per_sample_gradient_norms, expected_norms, rtol=1e-9, atol=1e-12)
    for param, want in zip(model.parameters(), expected):
        torch.testing.assert_close(param.grad, want, rtol=1e-8, atol=1e-12)
    coefficients = (max_grad_norm / (wrapped.per_sample_gradient_norms + 1e-6)).clamp(max=1.0)
    assert torch.all(coefficients * wrapped.per_sample_gradient_norms <= max_grad_norm * (1 + 1e-9))
    assert (coefficients < 1).any() and (coefficients == 1).any()


def test_a_batch_that_is_not_whole_groups_of_views_is_refused():
    """Rows that do not split into K views per sample are refused, with no gradient left behind."""
    model = _make_model()
    wrapped = BookKeepingModule(model, max_grad_norm=1.0, views=2)
    images, labels = _make_batch(5)

    with pytest.raises(ValueError, match="not whole groups of 2 views"):
        BookKeepingLoss(wrapped, nn.CrossEntropyLoss())(wrapped(images), labels).backward()

    assert all(p.grad is None for p in model.parameters())
