"""Detection and instance segmentation by fine-tuning the pretrained backbone (protocols.md §3, §4.5).

The backbone is not frozen: ``evaluate`` receives the method's evaluation backbone (a ``DenseBackbone``),
copies it, puts a Mask R-CNN (or Faster R-CNN, ``mask=false``) on top and fine-tunes everything, then
scores the val split with pycocotools ``COCOeval`` for ``bbox`` and ``segm``. The metrics are the two
12-entry COCO stats vectors, named ``bbox_AP, bbox_AP50, bbox_AP75, bbox_APs, bbox_APm, bbox_APl,
bbox_AR1, bbox_AR10, bbox_AR100, bbox_ARs, bbox_ARm, bbox_ARl`` and the same with ``segm_``, in percent
(stats·100; pycocotools' -1, "no ground truth in that area range", becomes NaN as in detectron2). The
primary metric is ``bbox_AP``. The text pycocotools printed (plus per-category AP) is kept as the
``cocoeval.txt`` artifact.

Backends (``backend``):
- ``torchvision`` (default): ``tasks/detection/torchvision_backend.py``; FPN on ResNet stages, the ViTDet
  simple feature pyramid on ViTs.
- ``detectron2``: the real detectron2 trainer in a subprocess (R50 configs of §3.3 with the §3.2 overrides),
  metrics read back; needs detectron2 installed and a ResNet backbone.

Presets (every field left unset takes the preset's value):
- ``1x``: the protocol's Mask R-CNN R50-FPN 1x (§3.3): batch 16, SGD lr 0.02, 90k iterations, ×0.1 at 60k
  and 80k, 1000 warm-up iterations, shorter side 640..800 (test 800, max 1333), FPN 256, 4conv1fc box head
  and 4-conv mask head with BatchNorm (per-batch statistics over the single process's 16 images: the
  single-process stand-in for SyncBN), nothing frozen.
- ``cityscapes``: detectron2's Cityscapes Mask R-CNN R50-FPN schedule: batch 8, lr 0.01, 24k iterations,
  ×0.1 at 18k, shorter side 800..1024 (test 1024, max 2048), the same heads as ``1x``.
- ``synthetic`` (the CPU default; a deviation from the protocol, scaled to about a minute on 2 cores): the
  native 96-px scenes, a 64-channel pyramid, 2fc box head (128), 1-conv mask head, no norm in the heads,
  anchors of 2 sizes per level (16/24 .. 256/384) with aspect 1, AdamW lr 1e-3, 200 iterations of 8 images
  (×0.1 at 170), at most 20 detections per image; see ``PRESETS``.

Scores are COCOeval on every dataset, Cityscapes included (the official Cityscapes instance AP of
``cityscapesscripts`` uses other matching rules; the detectron2 backend reports that one).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from bench.errors import BenchError
from bench.registry import TASKS
from tasks.base import EvalData, FeatureFn, Task, TaskResult
from tasks.detection import D2_INSTALL, require_detectron2  # noqa: F401 (re-exported)
from tasks.detection.coco import STAT_NAMES, coco_evaluate, coco_from_dict, dataset_to_coco, detections_to_results

log = logging.getLogger("bench.det")

_COMMON_1X = dict(
    train_sizes=[640, 672, 704, 736, 768, 800], test_size=800, max_size=1333,
    optimizer="sgd", weight_decay=1e-4, layer_decay=1.0, clip_grad=0.0, warmup_iters=1000,
    fpn_channels=256, box_convs=4, box_fc=1024, mask_convs=4, rpn_convs=1, norm="bn",
    anchor_sizes=[32, 64, 128, 256, 512], aspect_ratios=[0.5, 1.0, 2.0],
    rpn_pre_nms_train=2000, rpn_pre_nms_test=1000, rpn_post_nms_train=1000, rpn_post_nms_test=1000,
    rpn_batch_per_image=256, roi_batch_per_image=512, detections_per_image=100, eval_batch_size=4,
    loader_workers=4,
)
PRESETS = {
    # The CPU default on the 96-px synthetic scenes (1-3 square-boxed things of 15-36 px per image), sized for
    # about a minute on 2 cores: native resolution, narrow heads without norm, 2 anchor sizes per level with
    # aspect 1 (every synthetic box is square; one size per octave left most objects with a single positive
    # anchor and the RPN learned far slower), AdamW, 200 iterations of 8 images (about one epoch), at most
    # 20 detections per image (scenes hold at most 3 things; the mask head's cost is per detection).
    "synthetic": dict(
        iters=200, batch_size=8, lr=1e-3, steps=[170], warmup_iters=10, optimizer="adamw", weight_decay=0.05,
        layer_decay=1.0, clip_grad=1.0, train_sizes=[96], test_size=96, max_size=1333,
        fpn_channels=64, box_convs=0, box_fc=128, mask_convs=1, rpn_convs=1, norm="none",
        anchor_sizes=[[16, 24], [32, 48], [64, 96], [128, 192], [256, 384]], aspect_ratios=[1.0],
        rpn_pre_nms_train=300, rpn_pre_nms_test=500, rpn_post_nms_train=300, rpn_post_nms_test=100,
        rpn_batch_per_image=128, roi_batch_per_image=64, detections_per_image=20, eval_batch_size=16,
        loader_workers=0,
    ),
    "1x": dict(iters=90000, batch_size=16, lr=0.02, steps=[60000, 80000], **_COMMON_1X),
    "cityscapes": dict(_COMMON_1X, iters=24000, batch_size=8, lr=0.01, steps=[18000],
                       train_sizes=list(range(800, 1025, 32)), test_size=1024, max_size=2048),
}
BACKENDS = ("torchvision", "detectron2")


@dataclass
class DetConfig:
    preset: str = "synthetic"  # synthetic | 1x | cityscapes
    backend: str = "torchvision"  # torchvision | detectron2
    mask: bool = True  # Mask R-CNN; false = Faster R-CNN (box AP only)
    iters: Optional[int] = None
    batch_size: Optional[int] = None  # images per iteration
    lr: Optional[float] = None
    steps: Optional[list] = None  # iterations of the ×0.1 drops (scaled with iters when only iters is set)
    warmup_iters: Optional[int] = None
    optimizer: Optional[str] = None  # sgd (momentum 0.9) | adamw
    weight_decay: Optional[float] = None
    layer_decay: Optional[float] = None  # ViTDet layer-wise lr decay for ViT backbones (1 = off)
    clip_grad: Optional[float] = None  # global grad-norm clip, 0 = off
    train_sizes: Optional[list] = None  # shorter-side choices in training
    test_size: Optional[int] = None
    max_size: Optional[int] = None
    fpn_channels: Optional[int] = None
    box_convs: Optional[int] = None  # 4 = 4conv1fc, 0 = 2fc
    box_fc: Optional[int] = None
    mask_convs: Optional[int] = None
    rpn_convs: Optional[int] = None
    norm: Optional[str] = None  # bn | gn | ln | none, in the FPN and heads
    anchor_sizes: Optional[list] = None  # one size (or a list of sizes) per level p2..p6
    aspect_ratios: Optional[list] = None  # anchor height/width ratios, the same at every level
    rpn_pre_nms_train: Optional[int] = None
    rpn_pre_nms_test: Optional[int] = None
    rpn_post_nms_train: Optional[int] = None
    rpn_post_nms_test: Optional[int] = None
    rpn_batch_per_image: Optional[int] = None
    roi_batch_per_image: Optional[int] = None
    eval_batch_size: Optional[int] = None
    loader_workers: Optional[int] = None
    score_thresh: float = 0.05
    detections_per_image: Optional[int] = None  # COCO's maxDets is 100
    flip: bool = True
    max_train_images: int = 0  # 0 = the whole train split
    max_val_images: int = 0  # 0 = the whole val split
    seed: int = 500
    d2_config: str = ""  # detectron2 config family; "" = coco_R_50_FPN_1x (cityscapes_R_50_FPN on Cityscapes)
    d2_gpus: int = 1
    d2_output: str = ""  # detectron2 work folder; "" = a temporary one

    def validate(self, where: str) -> None:
        if self.preset not in PRESETS:
            raise BenchError(f"{where}.preset: unknown preset '{self.preset}'; valid: {', '.join(PRESETS)}")
        if self.backend not in BACKENDS:
            raise BenchError(f"{where}.backend: unknown backend '{self.backend}'; valid: {', '.join(BACKENDS)}")
        preset = PRESETS[self.preset]
        if self.iters is not None:
            # the user shortened or lengthened the schedule: keep drops and warm-up at the same fractions
            scale = self.iters / preset["iters"]
            if self.steps is None:
                self.steps = [max(1, round(s * scale)) for s in preset["steps"]]
            if self.warmup_iters is None:
                self.warmup_iters = max(1, round(preset["warmup_iters"] * scale))
        for key, value in preset.items():
            if getattr(self, key) is None:
                setattr(self, key, copy.deepcopy(value))
        if self.iters < 1 or self.batch_size < 1 or self.lr <= 0:
            raise BenchError(f"{where}: iters, batch_size and lr must be positive")
        if self.optimizer not in ("sgd", "adamw"):
            raise BenchError(f"{where}.optimizer: expected sgd or adamw, got '{self.optimizer}'")
        if self.norm not in ("bn", "gn", "ln", "none"):
            raise BenchError(f"{where}.norm: expected bn, gn, ln or none, got '{self.norm}'")
        if len(self.anchor_sizes) != 5:
            raise BenchError(f"{where}.anchor_sizes: expected 5 sizes (levels p2..p6), got {self.anchor_sizes}")
        try:  # a size or a list of sizes per level -> a list of sizes per level
            self.anchor_sizes = [[int(v) for v in (a if isinstance(a, (list, tuple)) else [a])]
                                 for a in self.anchor_sizes]
        except (TypeError, ValueError):
            raise BenchError(f"{where}.anchor_sizes: expected 5 sizes or lists of sizes, got {self.anchor_sizes}") \
                from None
        if not self.train_sizes:
            raise BenchError(f"{where}.train_sizes: expected at least one shorter-side size")
        self.steps = sorted(int(s) for s in self.steps)
        if self.backend == "detectron2":
            require_detectron2(where)


def per_category_ap(evaluator_text: str, raw_precision: Optional[np.ndarray], names: list[str]) -> str:
    """Appends one ``name: AP`` line per category (area all, 100 detections, NaN without ground truth)."""
    if raw_precision is None:
        return evaluator_text
    lines = [evaluator_text.rstrip(), "per-category AP (area all, maxDets 100):"]
    for k, name in enumerate(names):
        p = raw_precision[:, :, k, 0, -1]
        p = p[p > -1]
        lines.append(f"  {name}: {100 * p.mean():.2f}" if p.size else f"  {name}: nan")
    return "\n".join(lines) + "\n"


@TASKS.register("det")
class Detection(Task):
    config_class = DetConfig
    primary = "bbox_AP"
    display_metrics = ("bbox_AP", "bbox_AP50", "segm_AP")  # the terminal table; the full COCO set goes to CSV/MLflow
    needs_backbone = True  # bench.evaluate passes the trainable DenseBackbone as ``backbone=``

    def evaluate(self, features: FeatureFn, data: EvalData, device: torch.device, backbone=None) -> TaskResult:
        cfg: DetConfig = self.cfg
        if backbone is None:
            raise BenchError("det fine-tunes the backbone: call evaluate(..., backbone=<DenseBackbone>)")
        for split in (data.train, data.val):
            if not getattr(split, "has_instances", False) or not getattr(split, "thing_classes", None):
                raise BenchError(f"det: dataset '{data.name}' has no instance annotations; use synthetic, "
                                 f"coco_instances or cityscapes_instances (--data / --eval-data)")
        names = list(data.val.thing_classes)
        gen = torch.Generator().manual_seed(cfg.seed)
        n_train = len(data.train) if not cfg.max_train_images else min(cfg.max_train_images, len(data.train))
        train_idx = sorted(torch.randperm(len(data.train), generator=gen)[:n_train].tolist())
        n_val = len(data.val) if not cfg.max_val_images else min(cfg.max_val_images, len(data.val))
        val_idx = list(range(n_val))
        body = copy.deepcopy(backbone).float()
        for p in body.parameters():
            p.requires_grad_(True)

        if cfg.backend == "detectron2":
            from tasks.detection import d2_backend

            return d2_backend.run(cfg, body, data, train_idx, val_idx, names)

        from tasks.detection import torchvision_backend as tvb

        torch.manual_seed(cfg.seed)
        model = tvb.build_detector(body, len(names) + 1, cfg)
        train_info = tvb.finetune(model, body, data.train, train_idx, cfg, device, log=log.info)
        category_ids = getattr(data.val, "category_ids", None)
        results: dict = {"bbox": [], "segm": []}
        image_ids = []
        for index, boxes, scores, labels, masks in tvb.predict(model, data.val, val_idx, cfg, device):
            image_id = data.val.image_id(index) if hasattr(data.val, "image_id") else index + 1
            image_ids.append(image_id)
            out = detections_to_results(image_id, boxes, scores, labels, masks, category_ids)
            results["bbox"] += out["bbox"]
            results["segm"] += out["segm"]
        if hasattr(data.val, "coco_api"):
            gt = data.val.coco_api()  # the dataset's own annotation file, original category ids
        else:
            gt = coco_from_dict(dataset_to_coco(data.val, val_idx, names))
        iou_types = ("bbox", "segm") if cfg.mask else ("bbox",)
        metrics, raw, text = coco_evaluate(gt, results, iou_types, img_ids=image_ids)
        text = f"{len(results['bbox'])} detections on {len(image_ids)} images\n" + text
        for iou_type in iou_types:
            text = per_category_ap(f"{text}\n[{iou_type}]", raw.get(f"{iou_type}_precision"), names)
        kind = "Mask R-CNN" if cfg.mask else "Faster R-CNN"
        neck = "ViTDet simple pyramid" if body.is_vit else "FPN"
        protocol = (f"det[{cfg.preset}]: torchvision {kind}, {neck} on {body.name}, fine-tuned end to end, "
                    f"{cfg.optimizer} lr {cfg.lr} wd {cfg.weight_decay}, {cfg.iters} it x {cfg.batch_size} img "
                    f"(x0.1 at {cfg.steps}, warm-up {cfg.warmup_iters}), shorter side {cfg.train_sizes}/"
                    f"{cfg.test_size}, pycocotools COCOeval {'+'.join(iou_types)} (stats x100, -1 -> NaN), "
                    f"{len(train_idx)} train / {len(val_idx)} val images; final loss "
                    f"{train_info['final_loss_ema']:.3f}")
        return TaskResult(metrics=metrics, protocol=protocol, figures={"cocoeval.txt": text.encode()})


__all__ = ["Detection", "DetConfig", "PRESETS", "STAT_NAMES", "require_detectron2"]
