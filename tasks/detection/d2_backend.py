"""The ``det`` task's detectron2 backend: export, config, subprocess, metrics back.

1. The fine-tuning copy of the backbone (a ResNet) is converted to the detectron2 pickle (``d2_convert``).
2. Datasets: a dataset that names its detectron2 form (``d2_dataset(split)`` -> ``(name, json, image_root)``
   or a built-in name such as ``cityscapes_fine_instance_seg_val``) is used as it is; any other (the synthetic
   scenes, subsets) is written out as COCO JSON + PNG images and registered with ``--register``.
3. The config is the family's (``tasks.det.d2_config``; ``coco_R_50_FPN_1x`` by default,
   ``cityscapes_R_50_FPN`` on Cityscapes) with the task's schedule, sizes, anchors and class count.
4. ``python -m tasks.detection.d2_train`` runs in a subprocess; its ``--metrics-out`` JSON comes back as
   ``bbox_AP, bbox_AP50, bbox_AP75, bbox_APs, bbox_APm, bbox_APl`` and the ``segm_`` equivalents (detectron2
   reports only these six per IoU type; Cityscapes gives ``segm_AP`` and ``segm_AP50``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from PIL import Image

from bench.errors import BenchError
from tasks.base import TaskResult
from tasks.detection import d2_config, d2_convert, require_detectron2
from tasks.detection.coco import dataset_to_coco

D2_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def write_coco_split(dataset, indices: list[int], names: list[str], folder: str) -> tuple[str, str]:
    """COCO JSON + PNG images of ``dataset[indices]`` under ``folder``; returns (json path, image root)."""
    image_root = os.path.join(folder, "images")
    os.makedirs(image_root, exist_ok=True)
    gt = dataset_to_coco(dataset, indices, names)
    for index, info in zip(indices, gt["images"]):
        path = os.path.join(image_root, info["file_name"])
        if not os.path.exists(path):
            Image.fromarray(dataset[index]["image"].permute(1, 2, 0).numpy()).save(path)
    json_path = os.path.join(folder, "instances.json")
    with open(json_path, "w") as fh:
        json.dump(gt, fh)
    return json_path, image_root


def metrics_from_d2(results: dict) -> dict:
    """detectron2 results ``{"bbox": {"AP": ..}, "segm": {..}}`` (already ×100) -> named metrics."""
    out = {}
    for iou_type in ("bbox", "segm"):
        for name in D2_NAMES:
            value = (results.get(iou_type) or {}).get(name)
            if value is not None:
                out[f"{iou_type}_{name}"] = float(value)
    return out


def run(cfg, body, data, train_idx: list[int], val_idx: list[int], names: list[str]) -> TaskResult:
    require_detectron2()
    if body.is_vit:
        raise BenchError(f"tasks.det.backend=detectron2 runs the protocol's R50 configs and needs a ResNet backbone "
                         f"(--backbone resnet50); '{body.name}' is a ViT: use tasks.det.backend=torchvision, or "
                         f"`bench export --format detectron2` for a ViTDet config")
    work = os.path.abspath(cfg.d2_output or tempfile.mkdtemp(prefix="bench-d2-"))
    os.makedirs(work, exist_ok=True)
    model, facts = d2_convert.backbone_to_d2(body)
    weights = os.path.join(work, "model.pkl")
    d2_convert.write_pickle(model, weights)

    register, env = [], dict(os.environ)
    split_names = []
    for split, ds, idx in (("train", data.train, train_idx), ("val", data.val, val_idx)):
        native = ds.d2_dataset(split) if hasattr(ds, "d2_dataset") and len(idx) == len(ds) else None
        if native is not None and native.get("builtin"):
            split_names.append(native["name"])
            env.update(native.get("env", {}))
        elif native is not None:
            split_names.append(native["name"])
            register.append(f"{native['name']}={native['json']}:{native['image_root']}")
        else:
            name = f"bench_{data.name}_{split}"
            json_path, root = write_coco_split(ds, idx, names, os.path.join(work, "data", split))
            split_names.append(name)
            register.append(f"{name}={json_path}:{root}")

    family = cfg.d2_config or ("cityscapes_R_50_FPN" if data.name.startswith("cityscapes") else "coco_R_50_FPN_1x")
    overrides = {
        "MODEL": {"MASK_ON": bool(cfg.mask), "ROI_HEADS": {"NUM_CLASSES": len(names)},
                  "ANCHOR_GENERATOR": {"SIZES": [list(s) for s in cfg.anchor_sizes],
                                       "ASPECT_RATIOS": [[float(r) for r in cfg.aspect_ratios]]}},
        "DATASETS": {"TRAIN": [split_names[0]], "TEST": [split_names[1]]},
        "SOLVER": {"IMS_PER_BATCH": cfg.batch_size, "BASE_LR": cfg.lr, "STEPS": list(cfg.steps),
                   "MAX_ITER": cfg.iters, "WARMUP_ITERS": min(cfg.warmup_iters, cfg.iters)},
        "INPUT": {"MIN_SIZE_TRAIN": list(cfg.train_sizes), "MIN_SIZE_TEST": cfg.test_size,
                  "MAX_SIZE_TRAIN": cfg.max_size, "MAX_SIZE_TEST": cfg.max_size},
        "TEST": {"EVAL_PERIOD": 0, "DETECTIONS_PER_IMAGE": cfg.detections_per_image},
        "SEED": cfg.seed,
    }
    if "C4" in family:
        overrides["MODEL"].pop("ANCHOR_GENERATOR")  # one feature map: detectron2's single-level anchors
    config = d2_config.detectron2_config(family, weights, facts["depth"], facts["res2_out_channels"], overrides)
    config_path = os.path.join(work, f"{family}.yaml")
    d2_config.dump_yaml(config, config_path, header=f"# bench det task, backend detectron2, family {family}")
    metrics_path = os.path.join(work, "metrics.json")
    cmd = [sys.executable, "-m", "tasks.detection.d2_train", "--config-file", config_path,
           "--num-gpus", str(cfg.d2_gpus), "--output-dir", os.path.join(work, "output"), "--metrics-out", metrics_path]
    for spec in register:
        cmd += ["--register", spec]
    log_path = os.path.join(work, "d2_train.log")
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0 or not os.path.exists(metrics_path):
        tail = open(log_path).read().strip().splitlines()[-1:] or ["no output"]
        raise BenchError(f"det: detectron2 training failed (exit {proc.returncode}): {tail[0][:200]}; log {log_path}")
    with open(metrics_path) as fh:
        metrics = metrics_from_d2(json.load(fh))
    if not metrics:
        raise BenchError(f"det: detectron2 returned no bbox/segm metrics; see {metrics_path}")
    protocol = (f"det[{cfg.preset}]: detectron2 {family} (SyncBN, FREEZE_AT 0, RGB, STRIDE_IN_1X1 False) on "
                f"{body.name}, {cfg.iters} it x {cfg.batch_size} img, lr {cfg.lr}, {len(train_idx)} train / "
                f"{len(val_idx)} val images; work dir {work}")
    with open(log_path, "rb") as fh:
        log_tail = fh.read()[-20000:]
    return TaskResult(metrics=metrics, protocol=protocol, figures={"d2_train.log": log_tail})
