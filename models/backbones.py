"""Backbones for DMSNet, written here (no torchvision, no timm) and trained from scratch.

Each returns the four stage features DMSNet's heads consume (`forward_stages`) and lists their channel counts in
`stage_channels`. Parameter names follow torchvision's `resnet50` and `vgg16_bn` at width 1.0, so a user who
already has such a state_dict on disk can load it into `model.backbone` with
`load_state_dict_file(model.backbone, path, strict=False)` (the classifier keys are simply not used).
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers import NormLayer, make_divisible


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3×3 conv), torchvision's parameter names."""

    expansion = 4

    def __init__(self, in_chs: int, mid_chs: int, *, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        out_chs = mid_chs * self.expansion
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = norm_layer(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = norm_layer(out_chs)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                                            norm_layer(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


class ResNet(nn.Module):
    """ResNet feature extractor: 7×7/2 stem, 3×3/2 max-pool, four bottleneck stages at strides 4, 8, 16, 32.

    `layers=(3, 4, 6, 3)` is ResNet-50. `width` scales every stage's channels (1.0 is the real network, so
    torchvision's weights fit).
    """

    def __init__(
        self,
        *,
        layers: tuple[int, int, int, int],
        in_chans: int,
        norm_layer: NormLayer,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        stem = make_divisible(64 * width, 4)
        self.conv1 = nn.Conv2d(in_chans, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(stem)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_chs = stem
        self.stage_channels: list[int] = []
        for index, (base, count) in enumerate(zip((64, 128, 256, 512), layers), start=1):
            mid = make_divisible(base * width, 4)
            blocks = []
            for position in range(count):
                stride = 2 if position == 0 and index > 1 else 1
                blocks.append(Bottleneck(in_chs, mid, stride=stride, norm_layer=norm_layer))
                in_chs = mid * Bottleneck.expansion
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
            self.stage_channels.append(in_chs)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of layer1..layer4."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = []
        for index in range(1, 5):
            x = getattr(self, f"layer{index}")(x)
            stages.append(x)
        return stages


class VGG(nn.Module):
    """VGG feature extractor with a norm layer after every conv (torchvision's `vgg16_bn` layout, `features.N`).

    `depths` convs of `widths` channels per block, each block closed by a 2×2 max-pool; the four stage features
    are the pooled outputs of the last four blocks, at strides 4, 8, 16, 32 (12, 6, 3, 2 pixels for a 48×48 face:
    the pools round up), the same geometry as the ResNet backbone, so DMSNet's heads cost the same on both.
    Normalisation is there because a 13-conv plain net trained from scratch does not train reliably without it
    (the original VGG-16 was trained in stages for that reason). Pools have no parameters, so rounding up changes
    no weight and torchvision's `vgg16_bn.features` weights still load.
    """

    WIDTHS = (64, 128, 256, 512, 512)

    def __init__(
        self,
        *,
        in_chans: int,
        norm_layer: NormLayer,
        width: float = 1.0,
        depths: tuple[int, ...] = (2, 2, 3, 3, 3),
        widths: tuple[int, ...] = WIDTHS,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_chs = in_chans
        pools: list[int] = []
        self.stage_channels: list[int] = []
        for depth, base in zip(depths, widths):
            out_chs = make_divisible(base * width, 4)
            for _ in range(depth):
                layers += [nn.Conv2d(in_chs, out_chs, 3, padding=1), norm_layer(out_chs), nn.ReLU()]
                in_chs = out_chs
            pools.append(len(layers))
            layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            self.stage_channels.append(out_chs)
        self.features = nn.Sequential(*layers)
        self._taps = set(pools[-4:])
        self.stage_channels = self.stage_channels[-4:]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The pooled outputs of the last four blocks."""
        stages = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._taps:
                stages.append(x)
        return stages


def resnet50_backbone(
    *, in_chans: int, norm_layer: NormLayer, width: float = 1.0, depths: tuple[int, int, int, int] = (3, 4, 6, 3)
) -> ResNet:
    """ResNet-50 (3-4-6-3 bottlenecks): stage channels 256, 512, 1024, 2048 at width 1; `depths` shortens it."""
    return ResNet(layers=depths, in_chans=in_chans, norm_layer=norm_layer, width=width)


def vgg16_backbone(
    *, in_chans: int, norm_layer: NormLayer, width: float = 1.0, depths: tuple[int, ...] = (2, 2, 3, 3, 3)
) -> VGG:
    """VGG-16's 13 convs (2-2-3-3-3): stage channels 128, 256, 512, 512 at width 1; `depths` shortens it."""
    return VGG(in_chans=in_chans, norm_layer=norm_layer, width=width, depths=depths)


class PoolNet(nn.Module):
    """Plain conv → norm → ReLU → 2×2 max-pool blocks; the stages are the pooled outputs of the last four blocks.

    For faces this small, max-pooling after a full-resolution conv keeps a feature that is one or two pixels wide
    (a lip corner) and tolerates its shifting by a pixel, where a strided conv samples it away: on the synthetic
    faces a ResNet-10 with a strided stem stayed at chance for epochs where this reached well above it.
    """

    def __init__(self, *, in_chans: int, norm_layer: NormLayer, channels: tuple[int, ...], width: float = 1.0) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_chs = in_chans
        for chs in channels:
            out_chs = make_divisible(chs * width, 4)
            blocks.append(nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False), norm_layer(out_chs),
                                        nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)))
            in_chs = out_chs
        self.blocks = nn.Sequential(*blocks)
        self.stage_channels = [make_divisible(chs * width, 4) for chs in channels[-4:]]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the last four blocks."""
        stages = []
        for block in self.blocks:
            x = block(x)
            stages.append(x)
        return stages[-4:]


def iot_backbone(*, in_chans: int, norm_layer: NormLayer, width: float = 1.0) -> PoolNet:
    """Five conv-pool blocks of 16, 32, 64, 128, 128 channels: stages at 12, 6, 3 and 2 pixels for a 48×48 face
    (strides 4 to 32, ResNet-50's geometry), 0.25 M parameters and 9.6 M multiply-accumulates."""
    return PoolNet(in_chans=in_chans, norm_layer=norm_layer, channels=(16, 32, 64, 128, 128), width=width)
