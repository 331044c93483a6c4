"""ViCE's dense trunks: B×3×H×W -> B×embed_dim×(H/4)×(W/4) un-normalised maps (the loss upsamples them).

``light`` (the CPU default): the harness backbone (a ViT by default) feeds a light DeepLabV3+-style decoder, a 1×1
projection of the last map in place of ASPP (dilations 12/24/36 are meaningless on an 8×8 token grid) and a
stride-4 low-level branch (a two-conv stem for ViTs, layer1 for ResNets). ``deeplabv3plus`` (the reference,
``vissl/models/trunks/deeplabv3plus.py``, spec §1.3): a dilated ResNet at output stride 8, ASPP with separable
branches at rates 12/24/36 plus image pooling, and the DeepLabV3+ decoder on layer1, with BatchNorm that the harness
turns into SyncBN across workers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bench.errors import BenchError
from bench.tensorops import resize_bilinear


def init_decoder(module: nn.Module) -> None:
    """The reference's init: Kaiming-normal convs (fan-out), norm weight 1 and bias 1e-4."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.constant_(m.bias, 1e-4)  # the reference's BN bias init


def norm_layer(kind: str, ch: int) -> nn.Module:
    """GroupNorm (8 groups at most) or BatchNorm over ``ch`` channels."""
    return nn.GroupNorm(min(8, ch), ch) if kind == "gn" else nn.BatchNorm2d(ch)


class SepConv(nn.Module):
    """Depthwise 3×3 → ReLU → norm → pointwise 1×1 → ReLU → norm (the reference's order: ReLU before BN)."""

    def __init__(self, cin: int, cout: int, norm: str, dilation: int = 1):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False)
        self.n1 = norm_layer(norm, cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.n2 = norm_layer(norm, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.n2(F.relu(self.pw(self.n1(F.relu(self.dw(x))))))


class DenseTrunk(nn.Module):
    """Backbone + light DeepLabV3+-style decoder: B×3×H×W -> B×embed_dim×(H/4)×(W/4), not normalised."""

    def __init__(self, backbone, cfg):
        super().__init__()
        self.backbone = backbone
        norm = cfg.decoder_norm
        if backbone.is_vit:
            # stride-4 low-level features for a patch-8/16 ViT, in place of ResNet layer1
            self.stem = nn.Sequential(
                nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), norm_layer(norm, 32), nn.ReLU(inplace=True),
                nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), norm_layer(norm, 64), nn.ReLU(inplace=True))
            low_in = 64
        else:
            self.stem = None
            low_in = backbone.model.feature_info[1]["num_chs"]  # layer1 (stride 4)
        self.high = nn.Sequential(nn.Conv2d(backbone.embed_dim, cfg.decoder_dim, 1, bias=False),
                                  norm_layer(norm, cfg.decoder_dim), nn.ReLU(inplace=True))
        self.low = nn.Sequential(nn.Conv2d(low_in, cfg.low_level_dim, 1, bias=False),
                                 norm_layer(norm, cfg.low_level_dim), nn.ReLU(inplace=True))
        cat_dim = cfg.decoder_dim + cfg.low_level_dim
        self.fuse = nn.Sequential(*[SepConv(cat_dim if i == 0 else cfg.decoder_dim, cfg.decoder_dim, norm)
                                    for i in range(cfg.fuse_convs)])
        self.out = nn.Conv2d(cfg.decoder_dim if cfg.fuse_convs else cat_dim, cfg.embed_dim, 1)
        for mod in [self.high, self.low, self.fuse, self.out] + ([self.stem] if self.stem is not None else []):
            init_decoder(mod)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            low = self.stem(x)
            high = self.backbone.forward_dense(x)
        else:
            stages = self.backbone.forward_stages(x)
            low, high = stages[0], stages[-1]
        high = resize_bilinear(self.high(high), low.shape[-2:], align_corners=True).contiguous()
        return self.out(self.fuse(torch.cat([high, self.low(low)], dim=1)))


def upsample_to_stride(feat: torch.Tensor, image_side: int, stride: int) -> torch.Tensor:
    """Stride-4 map -> bilinear map at ``stride`` pixels per cell (identity for stride 4)."""
    side = image_side // stride
    if feat.shape[-1] == side and feat.shape[-2] == side:
        return feat
    return resize_bilinear(feat, (side, side))  # channels-last: the loss's B×h×w×D view of it is free


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: B×C_in×h×w -> B×dim×h×w.

    A 1×1 conv (BN, ReLU); one separable 3×3 branch per rate (depthwise dilated → ReLU → BN → pointwise → ReLU →
    BN, the reference's order); global average pool → 1×1 → BN → ReLU, upsampled; the concatenation → 3×3 conv →
    BN, with no ReLU after it (as the reference)."""

    def __init__(self, cin: int, dim: int, rates: tuple, norm: str = "bn"):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(cin, dim, 1, bias=False), norm_layer(norm, dim), nn.ReLU(inplace=True))
        self.branches = nn.ModuleList([SepConv(cin, dim, norm, dilation=int(r)) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, dim, 1, bias=False), norm_layer(norm, dim),
                                  nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(dim * (2 + len(rates)), dim, 3, padding=1, bias=False),
                                     norm_layer(norm, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = resize_bilinear(self.pool(x), x.shape[-2:], align_corners=True).contiguous()
        return self.project(torch.cat([self.conv1(x)] + [b(x) for b in self.branches] + [pooled], dim=1))


class DeepLabV3Plus(nn.Module):
    """Dilated ResNet (output stride 8) + ASPP + DeepLabV3+ decoder: B×3×H×W -> B×embed_dim×(H/4)×(W/4).

    Decoder: layer1 → 1×1 to ``low_level_dim`` (BN, ReLU); the ASPP map upsampled (bilinear, align_corners) to
    layer1's resolution; the concatenation → ``fuse_convs`` separable 3×3 convs to ``decoder_dim`` → 1×1 to
    ``embed_dim`` (ref 304 → 2 × 256 → 128)."""

    def __init__(self, backbone, cfg):
        super().__init__()
        if backbone.is_vit or backbone.stride != 8:
            raise BenchError(f"methods.vice.trunk=deeplabv3plus: needs a ResNet backbone at output stride 8 "
                             f"(e.g. backbone.name=resnet50, backbone.output_stride=8), got '{backbone.name}' at "
                             f"stride {backbone.stride}")
        self.backbone = backbone
        norm = cfg.decoder_norm
        self.aspp = ASPP(backbone.embed_dim, cfg.decoder_dim, tuple(cfg.aspp_rates), norm)
        low_in = backbone.model.feature_info[1]["num_chs"]  # layer1 (stride 4)
        self.low = nn.Sequential(nn.Conv2d(low_in, cfg.low_level_dim, 1, bias=False),
                                 norm_layer(norm, cfg.low_level_dim), nn.ReLU(inplace=True))
        cat_dim = cfg.decoder_dim + cfg.low_level_dim
        self.fuse = nn.Sequential(*[SepConv(cat_dim if i == 0 else cfg.decoder_dim, cfg.decoder_dim, norm)
                                    for i in range(cfg.fuse_convs)])
        self.out = nn.Conv2d(cfg.decoder_dim if cfg.fuse_convs else cat_dim, cfg.embed_dim, 1)
        for mod in (self.aspp, self.low, self.fuse, self.out):
            init_decoder(mod)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stages = self.backbone.forward_stages(x)
        low = self.low(stages[0])
        high = resize_bilinear(self.aspp(stages[-1]), low.shape[-2:], align_corners=True).contiguous()
        return self.out(self.fuse(torch.cat([high, low], dim=1)))


TRUNKS = {"light": DenseTrunk, "deeplabv3plus": DeepLabV3Plus}
