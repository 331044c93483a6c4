"""timm models as dense feature extractors: B×3×H×W images -> B×C×h×w feature maps.

ViTs give their last-block patch tokens after the final norm (CLS dropped) reshaped to the patch grid;
ResNets give their last stage map: layer4 at output stride 32, undilated, unless ``output_stride`` 16 or 8 asks
timm to replace the strides of layer4 (16) or layer3 and layer4 (8) by dilation (Leopart's R50 linear probe
uses stride 16, ViCE's DeepLabV3+ trunk stride 8). Weights start random (nothing can be downloaded) or come from a
local checkpoint (``backbone.init``), always loaded with ``weights_only=True``.
"""

from __future__ import annotations

import os
from typing import Callable

import timm
import torch
from torch import nn

from bench.errors import BenchError
from bench.registry import BACKBONES


class DenseBackbone(nn.Module):
    """Wraps a timm model. ``kind`` is "vit" or "cnn"; ``stride`` is pixels per feature cell."""

    def __init__(self, model: nn.Module, kind: str, embed_dim: int, stride: int, name: str):
        super().__init__()
        self.model = model
        self.kind = kind
        self.embed_dim = embed_dim
        self.stride = stride
        self.name = name

    @property
    def is_vit(self) -> bool:
        return self.kind == "vit"

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """ViT only: (CLS B×C, patch tokens B×N×C, grid (h, w)) after the final norm."""
        if not self.is_vit:
            raise TypeError(f"backbone {self.name} has no tokens (it is a CNN)")
        h, w = x.shape[-2] // self.stride, x.shape[-1] // self.stride
        out = self.model.forward_features(x)
        prefix = getattr(self.model, "num_prefix_tokens", 1)
        return out[:, 0], out[:, prefix:], (h, w)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """CNN only: the outputs of the four residual stages (strides 4, 8, 16, 32; with ``output_stride`` 16 or 8
        the later stages keep that stride)."""
        m = self.model
        x = m.maxpool(m.act1(m.bn1(m.conv1(x))))
        outs = []
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            x = layer(x)
            outs.append(x)
        return outs

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """B×3×H×W -> B×C×(H/stride)×(W/stride)."""
        if self.is_vit:
            _, tokens, (h, w) = self.forward_tokens(x)
            return tokens.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)
        return self.forward_stages(x)[-1]

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Image-level embedding B×C: CLS for ViTs, global average pool for CNNs."""
        if self.is_vit:
            return self.forward_tokens(x)[0]
        return self.forward_stages(x)[-1].mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_dense(x)


def _vit(name: str, patch: int, dim: int, depth: int, heads: int, img_size: int) -> Callable:
    def make(drop_path: float = 0.0, output_stride: int = 0) -> DenseBackbone:
        if output_stride not in (0, patch):
            raise BenchError(f"backbone.output_stride: {name} is a ViT with patch {patch}; its stride is the patch "
                             f"size (use 0), got {output_stride}")
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=img_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
            num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path,
        )
        return DenseBackbone(model, "vit", dim, patch, name)

    return make


def _resnet(name: str, timm_name: str, dim: int) -> Callable:
    def make(drop_path: float = 0.0, output_stride: int = 0) -> DenseBackbone:
        stride = output_stride or 32
        if stride not in (8, 16, 32):
            raise BenchError(f"backbone.output_stride: expected 0 (native 32), 8, 16 or 32 for {name}, "
                             f"got {output_stride}")
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="", drop_path_rate=drop_path,
                                  output_stride=stride)
        return DenseBackbone(model, "cnn", dim, stride, name)

    return make


# The CPU default: a 4-block ViT-Tiny width with 8-px patches, so 64-px crops give an 8×8 token grid.
BACKBONES.register("vit_tiny_d4_p8")(_vit("vit_tiny_d4_p8", 8, 192, 4, 3, 64))
BACKBONES.register("vit_tiny_p16")(_vit("vit_tiny_p16", 16, 192, 12, 3, 224))
BACKBONES.register("vit_small_p16")(_vit("vit_small_p16", 16, 384, 12, 6, 224))
BACKBONES.register("vit_small_p8")(_vit("vit_small_p8", 8, 384, 12, 6, 224))
BACKBONES.register("vit_base_p16")(_vit("vit_base_p16", 16, 768, 12, 12, 224))
BACKBONES.register("resnet18")(_resnet("resnet18", "resnet18", 512))
BACKBONES.register("resnet50")(_resnet("resnet50", "resnet50", 2048))


_PREFIXES = ("module.", "backbone.", "encoder.", "model.", "student.", "teacher.")


def _bench_eval_backbone_state(obj: dict, backbone_name: str) -> dict:
    """A bench pretraining checkpoint (``final.pt``: ``{"method", "method_state", "eval_backbone_prefix"}``) ->
    the state of the method's evaluation backbone (``Method.eval_backbone()``: DINO's teacher, CLoVE's configured
    branch, ...), keyed as the backbone's own ``state_dict``. This is how a method that fine-tunes another's
    weights (Leopart from DINO, as the reference does) chains on a bench run. ``final.pt`` records where that
    backbone sits; older files without the key ask the registered method (``Method.probe_eval_backbone_prefix``)."""
    from bench.registry import METHODS

    name = obj["method"]
    prefix = obj.get("eval_backbone_prefix")
    if not isinstance(prefix, str):
        if name not in METHODS:
            raise BenchError(f"checkpoint of method '{name}', which is not registered here")
        prefix = METHODS.get(name).probe_eval_backbone_prefix({}, backbone_name)
    state = {k[len(prefix):]: v for k, v in obj["method_state"].items() if k.startswith(prefix)}
    if not state:
        raise BenchError(f"checkpoint of method '{name}' holds no '{prefix}*' tensors")
    return state


def _extract_state_dict(obj: object, backbone_name: str = "") -> dict:
    if isinstance(obj, dict):
        if isinstance(obj.get("method_state"), dict) and isinstance(obj.get("method"), str):
            return _bench_eval_backbone_state(obj, backbone_name)
        for key in ("backbone", "state_dict", "model", "teacher", "student"):
            if key in obj and isinstance(obj[key], dict):
                return _extract_state_dict(obj[key])
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise BenchError("no state dict found (expected a dict of tensors, or one under 'backbone'/'state_dict'/'model')")


def load_init(backbone: DenseBackbone, path: str) -> int:
    """Load a local checkpoint into ``backbone``; returns how many tensors were loaded."""
    if not os.path.isfile(path):
        raise BenchError(f"--init {path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = _extract_state_dict(obj, backbone.name)
    except BenchError as exc:
        raise BenchError(f"--init {path}: {exc}") from None
    except Exception as exc:  # a truncated or foreign file: say so in one line
        raise BenchError(f"--init {path}: not a readable torch checkpoint ({type(exc).__name__})") from None
    target = backbone.model.state_dict()
    clean = {}
    for key, value in state.items():
        k = key
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        if k in target and target[k].shape == value.shape:
            clean[k] = value
    if not clean:
        example = next(iter(target))
        raise BenchError(f"--init {path}: no tensor matches backbone '{backbone.name}' (expected keys like '{example}')")
    backbone.model.load_state_dict(clean, strict=False)
    return len(clean)


def create_backbone(name: str, init: str = "", drop_path: float = 0.0, output_stride: int = 0) -> DenseBackbone:
    """``output_stride`` 0: the model's native stride (32 for ResNets, the patch for ViTs)."""
    backbone = BACKBONES.get(name)(drop_path=drop_path, output_stride=output_stride)
    if init:
        load_init(backbone, init)
    return backbone
