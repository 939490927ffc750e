"""Building blocks shared by the FER architectures.

Every block takes its normalisation layer as an argument (`norm_layer(num_channels) -> nn.Module`), timm-style, so
one architecture has two builds: BatchNorm for plain training and GroupNorm for DP-SGD, where BatchNorm is not
allowed because it mixes samples of a batch and so has no per-sample gradient.

Every block is made only of layers Opacus has exact per-sample-gradient samplers for (Conv2d, Linear, GroupNorm,
LayerNorm) plus parameter-free operations, so every `grad_sample_mode` works without custom samplers.
No activation is in-place: Opacus captures layer inputs during the forward pass, and an in-place op on a captured
tensor would silently corrupt its per-sample gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NormLayer = Callable[[int], nn.Module]


def batch_norm(num_channels: int) -> nn.Module:
    """The plain build's norm layer."""
    return nn.BatchNorm2d(num_channels)


def dp_group_count(num_channels: int) -> int:
    """Number of GroupNorm groups for `num_channels`: as many as possible up to 32, keeping >= 4 channels a group.

    Wu & He (2018) found 32 groups best; with fewer than 4 channels a group GroupNorm degenerates towards
    InstanceNorm, which loses too much signal in the narrow layers of the small builds.
    """
    for groups in (32, 16, 8, 4, 2):
        if num_channels % groups == 0 and num_channels // groups >= 4:
            return groups
    return 1


def group_norm(num_channels: int) -> nn.Module:
    """The DP build's norm layer: normalises each sample on its own, so per-sample gradients stay exact."""
    return nn.GroupNorm(dp_group_count(num_channels), num_channels)


def make_divisible(value: float, divisor: int = 8, *, minimum: int | None = None) -> int:
    """Rounds a scaled channel count to a multiple of `divisor` (never below `minimum`, nor 10% below `value`)."""
    minimum = divisor if minimum is None else minimum
    rounded = max(minimum, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvNormAct(nn.Sequential):
    """Conv2d → norm → ReLU, the unit most blocks are made of; `act=False` leaves the ReLU out."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        *,
        norm_layer: NormLayer,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, bias=False),
            norm_layer(out_chs),
        ]
        if act:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class DepthwiseSeparableConv(nn.Module):
    """Depthwise k×k conv then pointwise 1×1 conv (the DMSNet paper's "SCNet"): a k×k conv at ~1/k² the cost."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(in_chs, in_chs, kernel_size, padding=kernel_size // 2, groups=in_chs, bias=False)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_pw(self.conv_dw(x))


def bilinear_sample_taps(
    x: torch.Tensor,
    offset: torch.Tensor,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """Samples `x` at a deformable conv's shifted kernel taps: the deformable version of im2col.

    Tap (i, j) of output pixel (ho, wo) reads `x` at
    (ho·stride − pad + i·dil + Δy, wo·stride − pad + j·dil + Δx), with Δ from `offset`, bilinearly; corners outside
    the image read zero, each on its own, as in torchvision's `deform_conv2d`. An integer position gives exactly
    the pixel (weights 1, 0, 0, 0), so with zero offsets the result equals `F.unfold` bit for bit — which
    `grid_sample` cannot promise, because it round-trips positions through [-1, 1] coordinates.

    How: the input gets a zero border (1 before, 2 after) and positions are clamped to [-1, size], so all four
    corners of every tap are valid indices of the bordered image and no masks are needed; one `embedding_bag` (bags
    of the four corners, bilinear weights as per-sample weights) then gathers and blends every tap of every image in
    a single fused kernel, and is differentiable in both the image and the weights (hence the offsets). Clamping
    changes nothing: a tap at or beyond −1 or `size` reads only border zeros either way.

    Args:
        x: (B, C, H, W) input.
        offset: (B, 2·kh·kw, Ho, Wo); tap k = i·kw + j has (Δy, Δx) at channels (2k, 2k+1), torchvision's layout,
            so offset convs trained there load here.
        kernel_size, stride, padding, dilation: the deformable conv's geometry.

    Returns:
        (B, Ho·Wo, kh·kw·C), last axis ordered (i, j, c): one row per output pixel, ready for a Linear layer.
    """
    batch, channels, height, width = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    out_h, out_w = offset.shape[-2:]
    offset = offset.reshape(batch, kh, kw, 2, out_h, out_w)
    arange = lambda n: torch.arange(n, device=x.device, dtype=x.dtype)  # noqa: E731
    base_y = (arange(out_h) * sh - ph).view(out_h, 1, 1, 1) + (arange(kh) * dh).view(1, 1, kh, 1)
    base_x = (arange(out_w) * sw - pw).view(1, out_w, 1, 1) + (arange(kw) * dw).view(1, 1, 1, kw)
    # Positions laid out as (B, Ho, Wo, kh, kw), the row order of the result.
    pos_y = (base_y + offset[:, :, :, 0].permute(0, 3, 4, 1, 2)).clamp(-1, height)
    pos_x = (base_x + offset[:, :, :, 1].permute(0, 3, 4, 1, 2)).clamp(-1, width)
    y0 = torch.floor(pos_y)
    x0 = torch.floor(pos_x)
    frac_y = (pos_y - y0).reshape(-1)
    frac_x = (pos_x - x0).reshape(-1)

    padded_w = width + 3
    image_stride = (height + 3) * padded_w
    first = (y0.long() + 1) * padded_w + (x0.long() + 1)
    first = first.reshape(batch, -1) + torch.arange(batch, device=x.device).view(batch, 1) * image_stride
    first = first.reshape(-1)
    corners = torch.stack([first, first + 1, first + padded_w, first + padded_w + 1], dim=1)
    rest_y, rest_x = 1 - frac_y, 1 - frac_x
    weights = torch.stack([rest_y * rest_x, rest_y * frac_x, frac_y * rest_x, frac_y * frac_x], dim=1)
    table = F.pad(x, (1, 2, 1, 2)).permute(0, 2, 3, 1).reshape(-1, channels)
    taps = F.embedding_bag(corners, table, per_sample_weights=weights, mode="sum")
    return taps.view(batch, out_h * out_w, kh * kw * channels)


class DeformConv2d(nn.Module):
    """Deformable convolution v1 (Dai et al., 2017) in pure PyTorch: the DMSNet paper's "DeCNet".

    An offset conv predicts, for every output pixel, a (Δy, Δx) shift for each kernel tap; the input is sampled
    bilinearly at the shifted taps (`bilinear_sample_taps`, a deformable im2col) and one matrix product with the
    kernel finishes the convolution. Both learnable parts are layers Opacus has exact per-sample-gradient
    samplers for — `conv_offset` (nn.Conv2d) and `proj` (nn.Linear over the taps of each output pixel) — and the
    sampling has no parameters, so every grad_sample_mode (and ghost clipping, which has a fast norm for Linear)
    works with no custom sampler to keep correct. A Linear rather than a stride-k conv over a patch image because
    it is one GEMM with no layout copies, ~5× faster on CPU in the backward pass.

    `conv_weight` is the kernel as a plain conv's (out, in, k, k) weight (torchvision's layout), and
    `load_conv_weight` sets it from one. The offset conv starts at zero, so an untrained layer is exactly a plain
    conv and learns to deform from there.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: int | None = None,
        dilation: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2 if padding is None else padding
        self.in_chs, self.out_chs = in_chs, out_chs
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (stride, stride)
        self.padding = (padding, padding)
        self.dilation = (dilation, dilation)
        self.conv_offset = nn.Conv2d(
            in_chs, 2 * kernel_size * kernel_size, kernel_size, stride=stride, padding=padding, dilation=dilation
        )
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)
        self.proj = nn.Linear(kernel_size * kernel_size * in_chs, out_chs, bias=bias)
        # Initialised like the nn.Conv2d it generalises (same fan-in, so the same bounds).
        reference = nn.Conv2d(in_chs, out_chs, kernel_size, bias=bias)
        self.load_conv_weight(reference.weight.detach(), None if reference.bias is None else reference.bias.detach())

    @property
    def conv_weight(self) -> torch.Tensor:
        """The kernel as an (out, in, kh, kw) conv weight."""
        kh, kw = self.kernel_size
        return self.proj.weight.view(self.out_chs, kh, kw, self.in_chs).permute(0, 3, 1, 2)

    @torch.no_grad()
    def load_conv_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Sets the kernel from an (out, in, kh, kw) conv weight (and optional bias)."""
        self.proj.weight.copy_(weight.permute(0, 2, 3, 1).reshape(self.out_chs, -1))
        if bias is not None:
            self.proj.bias.copy_(bias)

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """Applies the layer; `offset` overrides the predicted offsets (for tests and for external offset nets)."""
        if offset is None:
            offset = self.conv_offset(x)
        taps = bilinear_sample_taps(
            x, offset, kernel_size=self.kernel_size, stride=self.stride, padding=self.padding, dilation=self.dilation
        )
        out_h, out_w = offset.shape[-2:]
        # Contiguous, not a strided view: Opacus's conv grad sampler unfolds its input with `as_strided`, which
        # silently assumes the default layout, so a view here would corrupt the next conv's per-sample gradients.
        return self.proj(taps).transpose(1, 2).reshape(x.shape[0], self.out_chs, out_h, out_w).contiguous()


class ReceptiveFieldBlock(nn.Module):
    """Receptive Field Block (Liu et al., ECCV 2018), the DMSNet paper's RFB.

    Three branches see the input through 3×3 convs dilated 1, 3 and 5, mimicking receptive fields that grow with
    eccentricity; their concatenation is fused by a 1×1 conv and added to a 1×1 shortcut. Here it also maps a
    stage's channels to the head width.

    `lite=False` is Liu et al.'s block: each branch has its own 1×1 reduction, and the dilated 3×3 is preceded by
    one 3×3 (branch 2) or two 3×3 (branch 3, a 5×5 factorised), 11 convs in all. `lite=True` shares one 1×1
    reduction among the branches and keeps only the dilated 3×3s: 6 convs, for the IoT build, where DP-SGD's
    cost grows with the number of layers more than with their size.
    """

    DILATIONS = (1, 3, 5)

    def __init__(self, in_chs: int, out_chs: int, *, norm_layer: NormLayer, lite: bool = False) -> None:
        super().__init__()
        mid = max(out_chs // 4, 4)
        self.lite = lite
        self.mid = mid
        if lite:
            self.reduce = ConvNormAct(in_chs, 3 * mid, 1, norm_layer=norm_layer)
            self.branches = nn.ModuleList(
                ConvNormAct(mid, mid, 3, norm_layer=norm_layer, dilation=d, act=False) for d in self.DILATIONS
            )
        else:
            self.branches = nn.ModuleList(
                nn.Sequential(
                    ConvNormAct(in_chs, mid, 1, norm_layer=norm_layer),
                    *[ConvNormAct(mid, mid, 3, norm_layer=norm_layer) for _ in range(index)],
                    ConvNormAct(mid, mid, 3, norm_layer=norm_layer, dilation=d, act=False),
                )
                for index, d in enumerate(self.DILATIONS)
            )
        self.fuse = ConvNormAct(3 * mid, out_chs, 1, norm_layer=norm_layer, act=False)
        self.shortcut = ConvNormAct(in_chs, out_chs, 1, norm_layer=norm_layer, act=False)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lite:
            # Contiguous chunks: Opacus's conv sampler assumes the default layout (see DeformConv2d.forward).
            parts = [part.contiguous() for part in self.reduce(x).split(self.mid, dim=1)]
            outs = [branch(part) for branch, part in zip(self.branches, parts)]
        else:
            outs = [branch(x) for branch in self.branches]
        return self.act(self.fuse(torch.cat(outs, dim=1)) + self.shortcut(x))


def upsample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize to `size` (no-op when already there): parameter-free, so nothing for Opacus to sample."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
