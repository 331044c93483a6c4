"""Mask R-CNN / Faster R-CNN from torchvision on a pretrained ``DenseBackbone``, fine-tuned end to end.

Feature pyramids (both give levels "0".."3" at strides 4, 8, 16, 32 plus "pool" at stride 64, C channels):

- ResNets: ``forward_stages`` (res2..res5, strides 4..32) into torchvision's ``FeaturePyramidNetwork`` with
  ``LastLevelMaxPool`` (p2..p6, as detectron2's Base-RCNN-FPN, protocols.md §3.3).
- ViTs: the ViTDet simple feature pyramid (§3.7) on the last-block patch tokens B×D×(H/p)×(W/p): a branch per
  output stride s with scale p/s: ×4 = deconv(D→D/2), LayerNorm, GELU, deconv(D/2→D/4); ×2 = one deconv;
  ×1 = identity; ×1/2 = 2×2 max-pool (×1/4 = 4×4 max-pool, needed for 8-px patches); each followed by a
  1×1 conv and a 3×3 conv to C channels with LayerNorm; p6 by stride-2 subsampling of the last level.
  The ViT runs at full attention (no windows, no relative position bias: the backbone is the pretrained
  model as it is; timm's dynamic image size interpolates the absolute position embedding to the input grid).

Heads (protocol R50-FPN 1x): RPN with anchors ``anchor_sizes`` (one per level) × ``aspect_ratios`` (0.5/1/2),
RoIAlign 7×7 (box) and 14×14 (mask) on levels 0..3, a ``box_convs``-conv ``box_fc``-fc box head (4conv1fc
in the protocol) and a ``mask_convs``-conv mask head, with ``norm`` (bn = per-batch BatchNorm, the
single-process stand-in for SyncBN; gn; ln; none) in the FPN and heads. ``mask=False`` gives Faster R-CNN.

Training (detectron2 semantics): random horizontal flip, shorter side drawn from ``train_sizes``, crowd
instances and images without instances skipped, linear warm-up from 0.001·lr, ×0.1 at each of ``steps``,
no weight decay on norms and biases; SGD momentum 0.9 or AdamW (with ViTDet layer-wise LR decay for ViTs).
Inference: shorter side ``test_size``, score threshold 0.05, NMS 0.5, at most 100 detections per image.
Images enter as RGB in [0, 1] and are normalised with the ImageNet mean/std the backbone was trained on.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Callable, Optional

import numpy as np
import torch
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from bench.backbones import DenseBackbone
from bench.data import IMAGENET_MEAN, IMAGENET_STD
from bench.errors import BenchError

LEVELS = ("0", "1", "2", "3")
STRIDES = (4, 8, 16, 32)


def norm_factory(kind: str) -> Optional[Callable[[int], nn.Module]]:
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda c: nn.GroupNorm(min(32, c), c)
    if kind == "ln":
        return LayerNorm2d
    if kind == "none":
        return None
    raise BenchError(f"tasks.det.norm: unknown norm '{kind}'; valid: bn, gn, ln, none")


class ResNetFPN(nn.Module):
    """ResNet stages (strides 4..32) -> FPN levels "0".."3" + "pool", ``out_channels`` each."""

    def __init__(self, body: DenseBackbone, out_channels: int, norm: str):
        super().__init__()
        self.body = body
        with torch.no_grad():
            was = body.training
            body.eval()
            chans = [f.shape[1] for f in body.forward_stages(torch.zeros(1, 3, 64, 64))]
            body.train(was)
        self.fpn = FeaturePyramidNetwork(chans, out_channels, extra_blocks=LastLevelMaxPool(),
                                         norm_layer=norm_factory(norm))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        stages = self.body.forward_stages(x)
        return self.fpn(OrderedDict(zip(LEVELS, stages)))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from a single-scale ViT map B×D×(H/p)×(W/p) -> levels "0".."3" + "pool"."""

    def __init__(self, body: DenseBackbone, out_channels: int):
        super().__init__()
        self.body = body
        dim, patch = body.embed_dim, body.stride
        self.branches = nn.ModuleList()
        for stride in STRIDES:
            ratio = patch / stride
            k = round(math.log2(ratio))
            if 2.0 ** k != ratio:
                raise BenchError(f"backbone {body.name}: patch {patch} cannot make a stride-{stride} level")
            layers: list[nn.Module] = []
            c = dim
            for i in range(max(k, 0)):
                if i:
                    layers += [LayerNorm2d(c), nn.GELU()]
                layers.append(nn.ConvTranspose2d(c, c // 2, kernel_size=2, stride=2))
                c //= 2
            if k < 0:
                layers.append(nn.MaxPool2d(kernel_size=2 ** -k, stride=2 ** -k))
            layers += [nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.branches.append(nn.Sequential(*layers))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feat = self.body.forward_dense(x)  # B×D×(H/p)×(W/p)
        out = OrderedDict((name, branch(feat)) for name, branch in zip(LEVELS, self.branches))
        out["pool"] = F.max_pool2d(out[LEVELS[-1]], kernel_size=1, stride=2)
        return out


def build_detector(body: DenseBackbone, num_classes: int, cfg) -> nn.Module:
    """Mask R-CNN (``cfg.mask``) or Faster R-CNN; ``num_classes`` counts the background (K things + 1)."""
    C = cfg.fpn_channels
    neck = SimpleFeaturePyramid(body, C) if body.is_vit else ResNetFPN(body, C, cfg.norm)
    norm = norm_factory(cfg.norm)
    ratios = tuple(float(r) for r in cfg.aspect_ratios)
    if len(cfg.anchor_sizes) != len(LEVELS) + 1:
        raise BenchError(f"tasks.det.anchor_sizes: expected {len(LEVELS) + 1} sizes (one per level p2..p6)")
    sizes = tuple(tuple(int(v) for v in (s if isinstance(s, (list, tuple)) else [s])) for s in cfg.anchor_sizes)
    if len({len(s) for s in sizes}) != 1:
        raise BenchError("tasks.det.anchor_sizes: every level needs the same number of sizes")
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=(ratios,) * len(sizes))
    box_head = FastRCNNConvFCHead((C, 7, 7), [C] * cfg.box_convs, [cfg.box_fc] * (1 if cfg.box_convs else 2),
                                  norm_layer=norm)
    common = dict(
        min_size=tuple(cfg.train_sizes), max_size=cfg.max_size, image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD), rpn_anchor_generator=anchors,
        rpn_head=RPNHead(C, len(ratios) * len(sizes[0]), conv_depth=cfg.rpn_convs),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_train, rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_train, rpn_post_nms_top_n_test=cfg.rpn_post_nms_test,
        rpn_batch_size_per_image=cfg.rpn_batch_per_image,
        box_roi_pool=MultiScaleRoIAlign(list(LEVELS), 7, 2), box_head=box_head,
        box_predictor=FastRCNNPredictor(cfg.box_fc, num_classes),
        box_batch_size_per_image=cfg.roi_batch_per_image, box_score_thresh=cfg.score_thresh,
        box_nms_thresh=0.5, box_detections_per_img=cfg.detections_per_image,
    )
    if not cfg.mask:
        return FasterRCNN(neck, **common)
    return MaskRCNN(neck, mask_roi_pool=MultiScaleRoIAlign(list(LEVELS), 14, 2),
                    mask_head=MaskRCNNHeads(C, [C] * cfg.mask_convs, 1, norm_layer=norm),
                    mask_predictor=MaskRCNNPredictor(C, C, num_classes), **common)


# ---------------------------------------------------------------------------------------- data

def item_to_target(item: dict, flip: bool, with_masks: bool) -> tuple[torch.Tensor, dict]:
    """(image 3×H×W float in [0, 1], target) with crowd and degenerate instances dropped."""
    img = item["image"].float() / 255.0
    W = img.shape[-1]
    boxes, labels, masks = [], [], []
    for inst in item.get("instances", []):
        if inst.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in inst["bbox"])
        if w < 1 or h < 1:
            continue
        boxes.append([x, y, x + w, y + h])
        labels.append(int(inst["category_id"]))
        if with_masks:
            masks.append(torch.as_tensor(np.asarray(inst["mask"]), dtype=torch.uint8))
    box_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    target = {"boxes": box_t, "labels": torch.tensor(labels, dtype=torch.int64)}
    if with_masks:
        target["masks"] = (torch.stack(masks) if masks else
                           torch.zeros((0,) + tuple(img.shape[-2:]), dtype=torch.uint8))
    if flip:
        img = img.flip(-1)
        b = target["boxes"].clone()
        target["boxes"] = torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], dim=1)
        if with_masks:
            target["masks"] = target["masks"].flip(-1)
    return img, target


class _TrainItems(torch.utils.data.Dataset):
    """Keys are (dataset index, flip); items are prepared (image, target) or None without instances."""

    def __init__(self, dataset, with_masks: bool):
        self.dataset, self.with_masks = dataset, with_masks

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, flip = key
        img, target = item_to_target(self.dataset[index], flip, self.with_masks)
        return None if len(target["boxes"]) == 0 else (img, target)


class _Stream(torch.utils.data.Sampler):
    """Endless (index, flip) keys: a fresh permutation of ``indices`` per epoch, flips with p = 0.5."""

    def __init__(self, indices: list[int], seed: int, flip: bool):
        self.indices, self.seed, self.flip = indices, seed, flip

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            for j in torch.randperm(len(self.indices), generator=gen).tolist():
                yield self.indices[j], bool(self.flip and torch.rand((), generator=gen) < 0.5)


# ---------------------------------------------------------------------------------------- training

def _vit_layer_id(name: str, depth: int) -> int:
    """ViTDet's layer id of a backbone parameter: embeddings 0, block i -> i + 1, the rest depth + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, body: DenseBackbone, weight_decay: float, layer_decay: float) -> list[dict]:
    """Groups with ``lr_scale`` (layer-wise decay for ViT backbones) and no decay on norms and biases."""
    body_ids = {id(p): n for n, p in body.model.named_parameters()}
    depth = len(getattr(body.model, "blocks", [])) if body.is_vit else 0
    groups: dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        if body.is_vit and layer_decay != 1.0 and id(p) in body_ids:
            scale = layer_decay ** (depth + 1 - _vit_layer_id(body_ids[id(p)], depth))
        no_wd = p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name
        key = (scale, no_wd)
        if key not in groups:
            groups[key] = {"params": [], "lr_scale": scale, "weight_decay": 0.0 if no_wd else weight_decay}
        groups[key]["params"].append(p)
    return list(groups.values())


def lr_factor(it: int, cfg) -> float:
    """detectron2 WarmupMultiStepLR: linear warm-up from 0.001, then ×0.1 at each step."""
    factor = 0.1 ** sum(it >= s for s in cfg.steps)
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        factor *= 0.001 * (1 - alpha) + alpha
    return factor


def finetune(model: nn.Module, body: DenseBackbone, dataset, indices: list[int], cfg, device: torch.device,
             log: Optional[Callable[[str], None]] = None) -> dict:
    """Train ``model`` for ``cfg.iters`` iterations of ``cfg.batch_size`` images; returns loss figures."""
    model.to(device).train()
    groups = param_groups(model, body, cfg.weight_decay, cfg.layer_decay)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    loader = torch.utils.data.DataLoader(
        _TrainItems(dataset, cfg.mask), batch_size=1, collate_fn=lambda b: b[0],
        sampler=_Stream(indices, cfg.seed, cfg.flip), num_workers=cfg.loader_workers,
        persistent_workers=False)
    stream = iter(loader)
    t0 = time.perf_counter()
    first = last = None
    skipped = 0
    for it in range(cfg.iters):
        factor = lr_factor(it, cfg)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * factor * g["lr_scale"]
        images, targets = [], []
        while len(images) < cfg.batch_size:
            sample = next(stream)
            if sample is None:
                skipped += 1
                if skipped > 10 * len(indices):
                    raise BenchError("det: the training split has no usable instances (all crowd or empty)")
                continue
            images.append(sample[0].to(device))
            targets.append({k: v.to(device) for k, v in sample[1].items()})
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise BenchError(f"det: loss became {loss.item()} at iteration {it}; lower tasks.det.lr "
                             f"(now {cfg.lr}) or raise tasks.det.warmup_iters")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        value = float(loss.detach())
        first = value if first is None else first
        last = value if last is None else 0.9 * last + 0.1 * value
        if log and (it % max(cfg.iters // 10, 1) == 0 or it == cfg.iters - 1):
            parts = " ".join(f"{k}={float(v.detach()):.3f}" for k, v in losses.items())
            log(f"det iter {it + 1}/{cfg.iters} loss {value:.3f} ({parts}) lr {cfg.lr * factor:.2e} "
                f"{time.perf_counter() - t0:.0f}s")
    return {"first_loss": first, "final_loss_ema": last, "train_seconds": time.perf_counter() - t0}


@torch.no_grad()
def predict(model: nn.Module, dataset, indices: list[int], cfg, device: torch.device):
    """Yields (dataset index, boxes N×4 x0y0x1y1, scores N, labels N, masks N×H×W bool or None), numpy."""
    model.to(device).eval()
    model.transform.min_size = (cfg.test_size,)
    for start in range(0, len(indices), cfg.eval_batch_size):
        chunk = indices[start:start + cfg.eval_batch_size]
        items = [dataset[i] for i in chunk]
        outputs = model([it["image"].to(device).float() / 255.0 for it in items])
        for i, out in zip(chunk, outputs):
            masks = None
            if "masks" in out:
                masks = (out["masks"][:, 0] > 0.5).cpu().numpy()
            yield (i, out["boxes"].cpu().numpy(), out["scores"].cpu().numpy(), out["labels"].cpu().numpy(), masks)
