"""The pure-PyTorch deformable convolution is exact: a plain conv at zero offsets, and equal to an independent
per-pixel bilinear computation and to a committed golden in torchvision's offset layout for any offsets, gradients
included."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.layers import DeformConv2d, bilinear_sample_taps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


GEOMETRIES = [  # (stride, padding, dilation)
    (1, 1, 1),
    (2, 1, 1),
    (1, 2, 2),
    (2, 0, 1),
    (1, 0, 2),
]


def _make_layer(*, in_chs=3, out_chs=4, stride=1, padding=1, dilation=1, seed=0) -> DeformConv2d:
    torch.manual_seed(seed)
    return DeformConv2d(in_chs, out_chs, 3, stride=stride, padding=padding, dilation=dilation).double()


def _make_input(*, batch=2, chs=3, height=7, width=8, seed=1) -> torch.Tensor:
    return torch.randn(batch, chs, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _out_size(size: int, *, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * 2 - 1) // stride + 1


def _make_offsets(x: torch.Tensor, *, stride: int, padding: int, dilation: int, scale: float, seed=2) -> torch.Tensor:
    out_h = _out_size(x.shape[2], stride=stride, padding=padding, dilation=dilation)
    out_w = _out_size(x.shape[3], stride=stride, padding=padding, dilation=dilation)
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(x.shape[0], 18, out_h, out_w, generator=generator, dtype=x.dtype)


def _bilinear(image: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """One channel-vector of `image` (C, H, W) at real position (y, x); each corner outside the image reads 0."""
    height, width = image.shape[1:]
    y0, x0 = math.floor(y), math.floor(x)
    value = torch.zeros(image.shape[0], dtype=image.dtype)
    for yc, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xc, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yc < height and 0 <= xc < width:
                value = value + wy * wx * image[:, yc, xc]
    return value


def _reference_deform_conv(x, offset, weight, bias, *, stride, padding, dilation) -> torch.Tensor:
    """Deformable conv v1 by its definition, one output pixel and one tap at a time (torchvision's offset layout:
    channel 2k is Δy and 2k+1 is Δx of tap k = i·3 + j)."""
    batch, out_chs = x.shape[0], weight.shape[0]
    out_h, out_w = offset.shape[2:]
    out = torch.zeros(batch, out_chs, out_h, out_w, dtype=x.dtype)
    for b in range(batch):
        for ho in range(out_h):
            for wo in range(out_w):
                acc = bias.clone()
                for i in range(3):
                    for j in range(3):
                        k = i * 3 + j
                        y = ho * stride - padding + i * dilation + float(offset[b, 2 * k, ho, wo])
                        xx = wo * stride - padding + j * dilation + float(offset[b, 2 * k + 1, ho, wo])
                        acc = acc + weight[:, :, i, j] @ _bilinear(x[b], y, xx)
                out[b, :, ho, wo] = acc
    return out


@pytest.mark.parametrize(("stride", "padding", "dilation"), GEOMETRIES)
def test_zero_offsets_sample_exactly_the_unfolded_patches(stride, padding, dilation):
    """With zero offsets the sampled taps are F.unfold's patches, bit for bit."""
    # Prepare
    x = _make_input()
    offset = _make_offsets(x, stride=stride, padding=padding, dilation=dilation, scale=0.0)
    # Execute
    geometry = {"stride": (stride, stride), "padding": (padding, padding), "dilation": (dilation, dilation)}
    taps = bilinear_sample_taps(x, offset, kernel_size=(3, 3), **geometry)
    # Assert: unfold orders a patch (c, i, j); the taps are (i, j, c)
    patches = F.unfold(x, 3, dilation=dilation, padding=padding, stride=stride)
    patches = patches.view(x.shape[0], x.shape[1], 9, -1).permute(0, 3, 2, 1).reshape(taps.shape)
    assert torch.equal(taps, patches)


@pytest.mark.parametrize(("stride", "padding", "dilation"), GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_offsets_equal_plain_conv(stride, padding, dilation, dtype):
    """An untrained layer (its offset conv starts at zero) computes exactly nn.Conv2d with the same kernel."""
    # Prepare
    layer = _make_layer(stride=stride, padding=padding, dilation=dilation).to(dtype)
    x = _make_input().to(dtype)
    # Execute
    out = layer(x)
    # Assert
    expected = F.conv2d(x, layer.conv_weight, layer.proj.bias, stride=stride, padding=padding, dilation=dilation)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(("stride", "padding", "dilation"), GEOMETRIES)
def test_offsets_match_per_pixel_bilinear_reference(stride, padding, dilation):
    """For random offsets, many taps out of the image included, the layer equals the definition computed by hand."""
    # Prepare
    layer = _make_layer(stride=stride, padding=padding, dilation=dilation)
    x = _make_input()
    offset = _make_offsets(x, stride=stride, padding=padding, dilation=dilation, scale=2.5)
    # Execute
    out = layer(x, offset)
    # Assert
    expected = _reference_deform_conv(
        x, offset, layer.conv_weight.detach(), layer.proj.bias.detach(), stride=stride, padding=padding,
        dilation=dilation,
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_constant_horizontal_offset_is_a_shifted_conv():
    """Δx = +1 on every tap reads one pixel further right: a plain conv whose zero padding moved from left to right."""
    # Prepare
    layer = _make_layer()
    x = _make_input()
    offset = torch.zeros(2, 18, 7, 8, dtype=torch.float64)
    offset[:, 1::2] = 1.0
    # Execute
    out = layer(x, offset)
    # Assert: columns wo-1+j+1 = wo+j for j = 0..2, i.e. no left padding and two columns on the right
    expected = F.conv2d(F.pad(x, (0, 2, 1, 1)), layer.conv_weight, layer.proj.bias)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_gradients_match_finite_differences():
    """Backward through the sampling (to the image, the offsets and the kernel) agrees with finite differences."""
    # Prepare: offsets away from integers, where bilinear sampling is not differentiable
    layer = _make_layer(in_chs=2, out_chs=2)
    x = _make_input(batch=1, chs=2, height=4, width=4).requires_grad_()
    offset = (0.3 + _make_offsets(x, stride=1, padding=1, dilation=1, scale=0.6).frac().abs() * 0.4).requires_grad_()
    offset = offset + torch.randint(-2, 3, offset.shape, generator=torch.Generator().manual_seed(5)).double()
    offset = offset.detach().requires_grad_()
    # Execute / Assert
    assert torch.autograd.gradcheck(lambda a, o: layer(a, o), (x, offset), eps=1e-6, atol=1e-7, fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda w: F.linear(
            bilinear_sample_taps(x, offset, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1)), w
        ),
        (layer.proj.weight.detach().clone().requires_grad_(),),
        fast_mode=True,
    )


def test_load_conv_weight_round_trips_a_conv_kernel():
    """A (out, in, k, k) kernel set with load_conv_weight comes back unchanged from conv_weight."""
    # Prepare
    layer = _make_layer()
    kernel = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    # Execute
    layer.load_conv_weight(kernel, torch.arange(4.0, dtype=torch.float64))
    # Assert
    assert torch.equal(layer.conv_weight, kernel)
    assert torch.equal(layer.proj.bias, torch.arange(4.0, dtype=torch.float64))


def test_per_sample_gradients_are_exact_under_opacus():
    """Opacus's hooks give each sample's true gradient for the deformable conv and for a conv fed by it."""
    # Prepare: non-zero offset weights so the sampling is really deformed
    from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct

    layer = _make_layer(in_chs=4, out_chs=4)
    nn.init.normal_(layer.conv_offset.weight, std=0.3)
    model = nn.Sequential(layer, nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1).double())
    x = _make_input(batch=3, chs=4, height=6, width=6)
    # Execute / Assert
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in ("hooks", "functorch"):
            assert check_per_sample_gradients_are_correct(x, model, grad_sample_mode=mode, atol=1e-10, rtol=1e-8)


GOLDEN = Path(__file__).parent / "fixtures" / "deform_conv_golden.npz"


@pytest.mark.parametrize("index", range(len(GEOMETRIES)))
def test_matches_torchvision_layout_golden(index):
    """Equal to a committed golden made by a float64 transcription of torchvision's deform_conv2d CPU kernel
    (tests/fixtures/make_deform_conv_golden.py): offsets trained in torchvision's layout mean the same here."""
    # Prepare
    golden = np.load(GOLDEN)
    stride, padding, dilation = (int(v) for v in golden[f"g{index}_geometry"])
    assert (stride, padding, dilation) == GEOMETRIES[index]
    x, offset, weight, bias = (torch.from_numpy(golden[f"g{index}_{name}"]) for name in ("x", "offset", "weight", "bias"))
    layer = _make_layer(stride=stride, padding=padding, dilation=dilation)
    layer.load_conv_weight(weight, bias)
    # Execute
    out = layer(x, offset)
    # Assert
    torch.testing.assert_close(out, torch.from_numpy(golden[f"g{index}_out"]), rtol=1e-10, atol=1e-10)
