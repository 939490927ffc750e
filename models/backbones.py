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


class BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convs), for the small IoT backbone."""

    expansion = 1

    def __init__(self, in_chs: int, out_chs: int, *, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = norm_layer(out_chs)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                                            norm_layer(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNet(nn.Module):
    """ResNet feature extractor: 7×7/2 stem, 3×3/2 max-pool, four stages at strides 4, 8, 16, 32.

    `ResNet(block=Bottleneck, layers=(3, 4, 6, 3))` is ResNet-50. `width` scales every stage's channels
    (1.0 is the real network, so torchvision's weights fit).
    """

    def __init__(
        self,
        *,
        block: type[Bottleneck] | type[BasicBlock],
        layers: tuple[int, int, int, int],
        in_chans: int,
        norm_layer: NormLayer,
        width: float = 1.0,
        stem_chs: int = 64,
        stem_kernel: int = 7,
        stem_pool: bool = True,
        base_chs: tuple[int, int, int, int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        stem = make_divisible(stem_chs * width, 4)
        self.conv1 = nn.Conv2d(in_chans, stem, stem_kernel, stride=2, padding=stem_kernel // 2, bias=False)
        self.bn1 = norm_layer(stem)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem_pool else nn.Identity()
        in_chs = stem
        self.stage_channels: list[int] = []
        for index, (base, count) in enumerate(zip(base_chs, layers), start=1):
            mid = make_divisible(base * width, 4)
            blocks = []
            for position in range(count):
                stride = 2 if position == 0 and (index > 1 or not stem_pool) else 1
                blocks.append(block(in_chs, mid, stride=stride, norm_layer=norm_layer))
                in_chs = mid * block.expansion
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

    The four stage features are the outputs of blocks 2–5 (before their max-pool), at strides 2, 4, 8, 16; block
    1's full-resolution map is not used, as in feature pyramids built on VGG. The final max-pool is dropped because
    nothing consumes it. Normalisation is there because a 13-conv plain net trained from scratch does not train
    reliably without it (the original VGG-16 was trained in stages for that reason).
    """

    VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)

    def __init__(self, *, in_chans: int, norm_layer: NormLayer, width: float = 1.0, cfg: tuple = VGG16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_chs = in_chans
        block_ends: list[int] = []
        self.stage_channels: list[int] = []
        for item in cfg:
            if item == "M":
                block_ends.append(len(layers) - 1)
                self.stage_channels.append(in_chs)
                layers.append(nn.MaxPool2d(2, stride=2))
                continue
            out_chs = make_divisible(int(item) * width, 4)
            layers += [nn.Conv2d(in_chs, out_chs, 3, padding=1), norm_layer(out_chs), nn.ReLU()]
            in_chs = out_chs
        block_ends.append(len(layers) - 1)
        self.stage_channels.append(in_chs)
        self.features = nn.Sequential(*layers)
        self._taps = set(block_ends[-4:])
        self.stage_channels = self.stage_channels[-4:]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the last four conv blocks."""
        stages = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._taps:
                stages.append(x)
        return stages


def resnet50_backbone(*, in_chans: int, norm_layer: NormLayer, width: float = 1.0) -> ResNet:
    """ResNet-50 (3-4-6-3 bottlenecks): stage channels 256, 512, 1024, 2048 at width 1."""
    return ResNet(block=Bottleneck, layers=(3, 4, 6, 3), in_chans=in_chans, norm_layer=norm_layer, width=width)


def vgg16_backbone(*, in_chans: int, norm_layer: NormLayer, width: float = 1.0) -> VGG:
    """VGG-16's 13 convs (2-2-3-3-3): stage channels 128, 256, 512, 512 at width 1."""
    return VGG(in_chans=in_chans, norm_layer=norm_layer, width=width)


def iot_backbone(*, in_chans: int, norm_layer: NormLayer, width: float = 1.0) -> ResNet:
    """A ResNet-10-style net for 48×48 faces on a CPU: 3×3/2 stem, no stem pool, one basic block a stage.

    Stage channels 16, 32, 64, 128 at strides 4, 8, 16, 32 (12, 6, 3, 2 pixels at 48×48), the same geometry as
    ResNet-50 at that size, for 0.31 M parameters.
    """
    return ResNet(
        block=BasicBlock, layers=(1, 1, 1, 1), in_chans=in_chans, norm_layer=norm_layer, width=width,
        stem_chs=16, stem_kernel=3, stem_pool=False, base_chs=(16, 32, 64, 128),
    )
