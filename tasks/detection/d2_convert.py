"""Backbone weights <-> the detectron2 weights pickle (protocols.md §3.1, §3.7).

ResNets (torchvision / timm names -> detectron2 ``ResNet`` names), the MoCo / DenseCL / PixPro procedure:

1. a key without ``layer`` gets the ``stem.`` prefix (``conv1.weight`` -> ``stem.conv1.weight``);
2. ``layer1..4`` -> ``res2..5``;
3. ``bn1/bn2/bn3`` -> ``conv1.norm / conv2.norm / conv3.norm`` (so the stem's ``bn1`` -> ``stem.conv1.norm``);
4. ``downsample.0`` -> ``shortcut``, ``downsample.1`` -> ``shortcut.norm``;
5. every tensor becomes a NumPy array, and ``{"model": ..., "__author__": ..., "matching_heuristics": True}``
   is pickled. detectron2's ``DetectionCheckpointer`` uses such a file as is; with ``matching_heuristics``
   each model key takes the longest checkpoint key that is a dot-suffix of it
   (``backbone.bottom_up.res2.0.conv1.weight`` <- ``res2.0.conv1.weight``); the author is not "Caffe2", so
   no Caffe2 renaming happens.

The weights are torchvision-style, so the detectron2 config must say ``INPUT.FORMAT: RGB``, the ImageNet
``PIXEL_MEAN``/``PIXEL_STD`` in 0..255 units and ``RESNETS.STRIDE_IN_1X1: False`` (timm and torchvision put
the stride in the 3×3 conv); ``d2_config`` writes those (§3.2).

ViTs (ViTDet, §3.7): timm's ``VisionTransformer`` already uses detectron2 ``ViT`` names for what ViTDet
loads (``patch_embed.proj.*``, ``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``);
they are suffixes of ``backbone.net.*`` and load by matching heuristics. ``cls_token`` and the final
``norm`` have no counterpart in ViTDet (no CLS token, no final norm) and are dropped. ``pos_embed`` keeps its
CLS slot (ViTDet's ``pretrain_use_cls_token=True`` drops it when resizing to the detection grid).
"""

from __future__ import annotations

import pickle
import re
from typing import Any

import numpy as np
import torch

from bench.backbones import DenseBackbone
from bench.errors import BenchError

AUTHOR = "bench"


def resnet_key_to_d2(key: str) -> str:
    new = key
    if "layer" not in new:
        new = "stem." + new
    for t in (1, 2, 3, 4):
        new = new.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        new = new.replace(f"bn{t}", f"conv{t}.norm")
    new = new.replace("downsample.0", "shortcut")
    new = new.replace("downsample.1", "shortcut.norm")
    return new


def d2_key_to_resnet(key: str) -> str:
    """The inverse of ``resnet_key_to_d2`` on every key it produces."""
    old = key[len("stem."):] if key.startswith("stem.") else key
    old = old.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    for t in (1, 2, 3):
        old = old.replace(f"conv{t}.norm", f"bn{t}")
    for t in (1, 2, 3, 4):
        old = re.sub(rf"\bres{t + 1}\.", f"layer{t}.", old)
    return old


def resnet_to_d2(state: dict) -> dict:
    """torchvision/timm ResNet state dict -> {detectron2 key: np.ndarray}."""
    out = {}
    for key, value in state.items():
        new = resnet_key_to_d2(key)
        if new in out:
            raise BenchError(f"detectron2 conversion: two tensors map to '{new}'")
        out[new] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return out


def d2_to_resnet(model: dict) -> dict:
    """{detectron2 key: array} -> ResNet state dict of tensors (for a round trip)."""
    return {d2_key_to_resnet(k): torch.from_numpy(np.array(v)) for k, v in model.items()}


VIT_DROP = ("cls_token", "norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")


def vit_to_d2(state: dict) -> dict:
    """timm ViT state dict -> ViTDet ``backbone.net`` suffix keys (arrays)."""
    out = {}
    for key, value in state.items():
        if key in VIT_DROP:
            continue
        if not (key.startswith(("patch_embed.", "blocks.")) or key == "pos_embed"):
            raise BenchError(f"ViTDet conversion: no ViTDet counterpart for '{key}'")
        out[key] = value.detach().cpu().numpy()
    return out


def resnet_depth(backbone: DenseBackbone) -> int:
    """50 for Bottleneck ResNets with 3-4-6-3 blocks, 18 for BasicBlock 2-2-2-2, ...; from the modules."""
    m = backbone.model
    if backbone.is_vit or not all(hasattr(m, f"layer{i}") for i in (1, 2, 3, 4)):
        raise BenchError(f"backbone {backbone.name}: not a ResNet")
    blocks = tuple(len(getattr(m, f"layer{i}")) for i in (1, 2, 3, 4))
    bottleneck = hasattr(m.layer1[0], "conv3")
    depths = {(True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152,
              (False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34}
    if (bottleneck, blocks) not in depths:
        raise BenchError(f"backbone {backbone.name}: ResNet layout {blocks} has no detectron2 depth")
    return depths[(bottleneck, blocks)]


def backbone_to_d2(backbone: DenseBackbone) -> tuple[dict, dict]:
    """(detectron2 ``model`` dict, facts for the config: kind, depth / ViT dims)."""
    state = backbone.model.state_dict()
    if backbone.is_vit:
        m = backbone.model
        facts = {"kind": "vit", "embed_dim": backbone.embed_dim, "depth": len(m.blocks),
                 "num_heads": m.blocks[0].attn.num_heads, "patch_size": backbone.stride,
                 "pretrain_img_size": int(m.patch_embed.img_size[0])}
        return vit_to_d2(state), facts
    depth = resnet_depth(backbone)
    return resnet_to_d2(state), {"kind": "resnet", "depth": depth, "res2_out_channels": 256 if depth >= 50 else 64}


def write_pickle(model: dict, path: str, author: str = AUTHOR) -> None:
    from bench.checkpoint import atomic_write_bytes

    blob = {"model": model, "__author__": author, "matching_heuristics": True}
    atomic_write_bytes(path, lambda fh: pickle.dump(blob, fh, protocol=pickle.HIGHEST_PROTOCOL))


def read_pickle(path: str) -> dict[str, Any]:
    """Our own exported file back (trusted input: it is a pickle, as detectron2's format requires)."""
    with open(path, "rb") as fh:
        return pickle.load(fh)
