"""detectron2 configs for the protocol's families (protocols.md §3.2, §3.3) and the launch script.

Each config is written self-contained (no ``_BASE_``: the base-file keys are spelled out), merged by
detectron2 onto its defaults with ``cfg.merge_from_file``. Families:

| family | what | schedule |
|---|---|---|
| ``coco_R_50_C4_1x`` | Mask R-CNN R50-C4 (MoCo's Base-RCNN-C4-BN: ``Res5ROIHeadsExtraNorm``, SyncBN, RPN test top-k 6000/1000) | 90k, steps 60k/80k (PixPro 1x) |
| ``coco_R_50_FPN_1x`` | Mask R-CNN R50-FPN (Base-RCNN-FPN + SyncBN in backbone, FPN, 4conv1fc box head and mask head) | 90k, steps 60k/80k |
| ``cityscapes_R_50_FPN`` | detectron2's Cityscapes Mask R-CNN R50-FPN (8 classes, 800..1024 "choice", test 1024, max 2048) + SyncBN in backbone and FPN [I] | 24k, step 18k, batch 8, lr 0.01 |
| ``voc_R_50_C4_24k`` | Faster R-CNN R50-C4 on VOC07+12 trainval, test VOC07 (Base-RCNN-C4-BN) | 24k, steps 18k/22k, 100 warm-up |

Every family gets the §3.2 overrides for torchvision-style weights: ``PIXEL_MEAN [123.675, 116.28, 103.53]``,
``PIXEL_STD [58.395, 57.12, 57.375]``, ``INPUT.FORMAT RGB``, ``RESNETS.STRIDE_IN_1X1 False``,
``BACKBONE.FREEZE_AT 0``, ``RESNETS.NORM SyncBN``, ``TEST.PRECISE_BN.ENABLED True`` and ``MODEL.WEIGHTS``.

``vitdet_config_py`` writes a LazyConfig (Python) for a patch-16 ViT (§3.7): ViTDet's Mask R-CNN with the
exported ViT's width/depth/heads, window attention except in 4 evenly spaced global blocks, large-scale
jitter at 1024, AdamW 1e-4 with layer-wise decay 0.7, 184,375 iterations of batch 64.
"""

from __future__ import annotations

import copy
import os

import yaml

from bench.errors import BenchError

PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]
COCO_TRAIN_SIZES = [640, 672, 704, 736, 768, 800]


def _ssl_overrides(weights: str, depth: int, res2_out: int) -> dict:
    return {
        "MODEL": {
            "WEIGHTS": weights, "PIXEL_MEAN": list(PIXEL_MEAN), "PIXEL_STD": list(PIXEL_STD),
            "BACKBONE": {"FREEZE_AT": 0},
            "RESNETS": {"DEPTH": depth, "RES2_OUT_CHANNELS": res2_out, "STRIDE_IN_1X1": False, "NORM": "SyncBN"},
        },
        "INPUT": {"FORMAT": "RGB"},
        "TEST": {"PRECISE_BN": {"ENABLED": True}},
    }


def _fpn_base() -> dict:
    """detectron2 Base-RCNN-FPN.yaml, spelled out."""
    return {
        "MODEL": {
            "META_ARCHITECTURE": "GeneralizedRCNN",
            "BACKBONE": {"NAME": "build_resnet_fpn_backbone"},
            "RESNETS": {"OUT_FEATURES": ["res2", "res3", "res4", "res5"]},
            "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"]},
            "ANCHOR_GENERATOR": {"SIZES": [[32], [64], [128], [256], [512]], "ASPECT_RATIOS": [[0.5, 1.0, 2.0]]},
            "RPN": {"IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"], "PRE_NMS_TOPK_TRAIN": 2000,
                    "PRE_NMS_TOPK_TEST": 1000, "POST_NMS_TOPK_TRAIN": 1000, "POST_NMS_TOPK_TEST": 1000},
            "ROI_HEADS": {"NAME": "StandardROIHeads", "IN_FEATURES": ["p2", "p3", "p4", "p5"]},
            "ROI_BOX_HEAD": {"NAME": "FastRCNNConvFCHead", "NUM_FC": 2, "POOLER_RESOLUTION": 7},
            "ROI_MASK_HEAD": {"NAME": "MaskRCNNConvUpsampleHead", "NUM_CONV": 4, "POOLER_RESOLUTION": 14},
        },
        "VERSION": 2,
    }


def _c4_base() -> dict:
    """MoCo's Base-RCNN-C4-BN.yaml on detectron2's Base-RCNN-C4.yaml, spelled out."""
    return {
        "MODEL": {
            "META_ARCHITECTURE": "GeneralizedRCNN",
            "BACKBONE": {"NAME": "build_resnet_backbone"},
            "RESNETS": {"OUT_FEATURES": ["res4"]},
            "RPN": {"IN_FEATURES": ["res4"], "PRE_NMS_TOPK_TEST": 6000, "POST_NMS_TOPK_TEST": 1000},
            "ROI_HEADS": {"NAME": "Res5ROIHeadsExtraNorm", "IN_FEATURES": ["res4"]},
        },
        "VERSION": 2,
    }


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _coco_schedule(sizes=COCO_TRAIN_SIZES) -> dict:
    return {
        "DATASETS": {"TRAIN": ["coco_2017_train"], "TEST": ["coco_2017_val"]},
        "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.02, "STEPS": [60000, 80000], "MAX_ITER": 90000},
        "INPUT": {"MIN_SIZE_TRAIN": list(sizes), "MIN_SIZE_TEST": 800},
    }


def family_coco_R_50_C4_1x() -> dict:
    return _merge(_merge(_c4_base(), _coco_schedule()),
                  {"MODEL": {"MASK_ON": True, "ROI_HEADS": {"NUM_CLASSES": 80}}})


def family_coco_R_50_FPN_1x() -> dict:
    return _merge(_merge(_fpn_base(), _coco_schedule()), {
        "MODEL": {
            "MASK_ON": True, "ROI_HEADS": {"NUM_CLASSES": 80},
            "FPN": {"NORM": "SyncBN"},
            "ROI_BOX_HEAD": {"NAME": "FastRCNNConvFCHead", "NUM_CONV": 4, "NUM_FC": 1, "NORM": "SyncBN"},
            "ROI_MASK_HEAD": {"NORM": "SyncBN"},
        },
    })


def family_cityscapes_R_50_FPN() -> dict:
    return _merge(_fpn_base(), {
        "MODEL": {"MASK_ON": True, "ROI_HEADS": {"NUM_CLASSES": 8}, "FPN": {"NORM": "SyncBN"}},
        "INPUT": {"MIN_SIZE_TRAIN": list(range(800, 1025, 32)), "MIN_SIZE_TRAIN_SAMPLING": "choice",
                  "MIN_SIZE_TEST": 1024, "MAX_SIZE_TRAIN": 2048, "MAX_SIZE_TEST": 2048},
        "DATASETS": {"TRAIN": ["cityscapes_fine_instance_seg_train"], "TEST": ["cityscapes_fine_instance_seg_val"]},
        "SOLVER": {"BASE_LR": 0.01, "STEPS": [18000], "MAX_ITER": 24000, "IMS_PER_BATCH": 8},
        "TEST": {"EVAL_PERIOD": 8000},
    })


def family_voc_R_50_C4_24k() -> dict:
    return _merge(_c4_base(), {
        "MODEL": {"MASK_ON": False, "ROI_HEADS": {"NUM_CLASSES": 20}},
        "INPUT": {"MIN_SIZE_TRAIN": list(range(480, 801, 32)), "MIN_SIZE_TEST": 800},
        "DATASETS": {"TRAIN": ["voc_2007_trainval", "voc_2012_trainval"], "TEST": ["voc_2007_test"]},
        "SOLVER": {"IMS_PER_BATCH": 16, "BASE_LR": 0.02, "STEPS": [18000, 22000], "MAX_ITER": 24000,
                   "WARMUP_ITERS": 100},
    })


FAMILIES = {
    "coco_R_50_C4_1x": family_coco_R_50_C4_1x,
    "coco_R_50_FPN_1x": family_coco_R_50_FPN_1x,
    "cityscapes_R_50_FPN": family_cityscapes_R_50_FPN,
    "voc_R_50_C4_24k": family_voc_R_50_C4_24k,
}


def detectron2_config(family: str, weights: str, depth: int = 50, res2_out_channels: int = 256,
                      overrides: dict | None = None) -> dict:
    """The full config dict of ``family`` for converted torchvision-style ResNet weights."""
    if family not in FAMILIES:
        raise BenchError(f"detectron2 config '{family}': unknown; valid: {', '.join(FAMILIES)}")
    if "C4" in family and depth < 50:
        raise BenchError(f"detectron2 config '{family}': the C4 res5 head needs a Bottleneck ResNet (depth >= 50), "
                         f"got depth {depth}; use an FPN family")
    cfg = _merge(FAMILIES[family](), _ssl_overrides(weights, depth, res2_out_channels))
    return _merge(cfg, overrides or {})


def dump_yaml(cfg: dict, path: str, header: str = "") -> None:
    from bench.checkpoint import atomic_write_bytes

    text = (header.rstrip() + "\n" if header else "") + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def launch_script(config_file: str, gpus: int = 8, lazy: bool = False) -> str:
    """A bash launcher for ``python -m tasks.detection.d2_train`` next to the config."""
    name = os.path.basename(config_file)
    return f"""#!/usr/bin/env bash
# Fine-tune the exported backbone with detectron2 (protocols.md section 3), config {name}.
# Needs detectron2 (not on PyPI): pip install 'git+https://github.com/facebookresearch/detectron2.git'
# Datasets are read from $DETECTRON2_DATASETS (coco/, cityscapes/, VOC2007/, VOC2012/ as detectron2 expects).
# Extra arguments are passed on, e.g. SOLVER.IMS_PER_BATCH 8 or --resume.
set -euo pipefail
here="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
export DETECTRON2_DATASETS="${{DETECTRON2_DATASETS:-datasets}}"
exec python -m tasks.detection.d2_train --config-file "$here/{name}" --num-gpus "${{NUM_GPUS:-{gpus}}}" \\
  --output-dir "${{OUTPUT_DIR:-$here/output}}"{' --lazy' if lazy else ''} "$@"
"""


def global_blocks(depth: int) -> list[int]:
    """ViTDet's 4 evenly spaced global-attention blocks (2, 5, 8, 11 for depth 12)."""
    return sorted({round((k + 1) * depth / 4) - 1 for k in range(4)})


def vitdet_config_py(weights: str, facts: dict, num_classes: int = 80) -> str:
    """A detectron2 LazyConfig for ViTDet Mask R-CNN on an exported patch-16 ViT (COCO, 100 epochs)."""
    if facts["patch_size"] != 16:
        raise BenchError(f"ViTDet config: detectron2's SimpleFeaturePyramid needs patch-16 ViTs (scale factors "
                         f"4, 2, 1, 0.5 -> strides 4..32); this backbone has patch {facts['patch_size']}")
    depth = facts["depth"]
    windowed = [i for i in range(depth) if i not in global_blocks(depth)]
    return f'''# ViTDet Mask R-CNN (protocols.md section 3.7) on an exported ViT: width {facts["embed_dim"]}, depth {depth},
# {facts["num_heads"]} heads, patch 16, pre-trained at {facts["pretrain_img_size"]} px. Generated by `bench export`.
from functools import partial

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
net = model.backbone.net
net.embed_dim = {facts["embed_dim"]}
net.depth = {depth}
net.num_heads = {facts["num_heads"]}
net.patch_size = 16
net.pretrain_img_size = {facts["pretrain_img_size"]}
net.pretrain_use_cls_token = True
net.drop_path_rate = 0.1
net.window_size = 14
net.window_block_indexes = {windowed}
net.use_rel_pos = True
model.backbone.in_feature = "last_feat"
model.roi_heads.num_classes = {num_classes}
model.pixel_mean = {PIXEL_MEAN}
model.pixel_std = {PIXEL_STD}
model.input_format = "RGB"

image_size = 1024
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.recompute_boxes = True
dataloader.train.total_batch_size = 64
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size)]
dataloader.test.mapper.image_format = "RGB"
dataloader.evaluator.use_fast_impl = False

train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = "{weights}"
train.max_iter = 184375
train.eval_period = 184375

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[163889, 177546],
                                         num_updates=train.max_iter),
    warmup_length=250 / train.max_iter, warmup_factor=0.001)

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers={depth}, lr_decay_rate=0.7)
optimizer.params.overrides = {{"pos_embed": {{"weight_decay": 0.0}}}}
optimizer.lr = 1e-4
optimizer.weight_decay = 0.1
'''
