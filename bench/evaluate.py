"""Evaluate one method (a trained checkpoint, or the untrained backbone) on a list of tasks.

Runs inside a Ray task in ``bench run`` (so it lands on a GPU node on a cluster); plain function otherwise.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from bench import checkpoint as ckpt
from bench.backbones import create_backbone
from bench.config import BackboneConfig, BenchConfig, PretrainConfig, build, to_dict
from bench.data import build_dataset
from bench.registry import DATASETS, TASKS
from tasks.base import EvalData


def load_eval_data(name: str, cfg_dict: dict) -> EvalData:
    cls = DATASETS.get(name)
    cfg = build(cls.config_class, cfg_dict, f"data.{name}")
    train, val = build_dataset(name, cfg, "train"), build_dataset(name, cfg, "val")
    return EvalData(name=name, train=train, val=val, num_classes=val.num_classes, class_names=list(val.class_names))


def feature_fn(method: str, final_path: str | None, spec: dict, device: torch.device):
    """(callable images -> B×C×h×w, module) for a trained method or for the ``random-init`` backbone."""
    from methods.build import load_trained_method

    bcfg = build(BackboneConfig, spec["backbone"], "backbone")
    if final_path is None:
        torch.manual_seed(spec["seed"])  # the same untrained weights the methods started from
        model = create_backbone(bcfg.name, bcfg.init, 0.0, bcfg.output_stride).to(device).eval()
        return model.forward_dense, model
    pcfg = build(PretrainConfig, spec["pretrain"], "pretrain")
    method_obj = load_trained_method(final_path, spec["method_cfg"], bcfg, pcfg, spec["n_pretrain_images"])
    method_obj.to(device)
    return method_obj.dense_features, method_obj


def protocol_record(task_obj, name: str) -> dict:
    """The protocol a task's number comes from: name, version, settings and their hash (part of the row key)."""
    cls = type(task_obj)
    return {"protocol_name": cls.protocol_name or name, "protocol_version": int(cls.protocol_version),
            "protocol_hash": task_obj.protocol_hash(), "protocol_settings": task_obj.protocol_settings(),
            "display_metrics": list(cls.display_metrics or (cls.primary,)),
            "higher_is_better": bool(cls.higher_is_better)}


def save_npz(arrays: dict, path: str) -> None:
    """Arrays (per-image statistics) to ``path`` atomically, compressed (mostly-zero confusion matrices)."""
    ckpt.atomic_write_bytes(path, lambda fh: np.savez_compressed(fh, **arrays))


def _count_params(module) -> int:
    """Parameters of the evaluated model: the evaluation backbone of a method (its dense features' source)."""
    target = module.eval_backbone() if hasattr(module, "eval_backbone") else module
    try:
        return int(sum(p.numel() for p in target.parameters()))
    except Exception:  # noqa: BLE001 - a feature source without parameters
        return 0


def evaluate_method(method: str, final_path: str | None, tasks: list[str], spec: dict, out_dir: str,
                    use_gpu: bool = False, threads: int = 0) -> dict:
    """Evaluate and write ``<out_dir>/eval_<task>.json`` per task (atomic); returns {task: result dict}."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    data = load_eval_data(spec["eval_dataset"], spec["eval_dataset_cfg"])
    feats, _module = feature_fn(method, final_path, spec, device)
    results = {}
    for task in tasks:
        path = os.path.join(out_dir, f"eval_{task}.json")
        if os.path.exists(path):
            results[task] = ckpt.load_json(path)
            continue
        cls = TASKS.get(task)
        task_obj = cls(build(cls.config_class, spec["tasks"].get(task, {}), f"tasks.{task}"))
        backbone = None
        if cls.needs_backbone:  # fine-tuning tasks (det) train a copy of the backbone
            backbone = _module.eval_backbone() if hasattr(_module, "eval_backbone") else _module
        res = task_obj.evaluate(feats, data, device, backbone=backbone)
        out = {"metrics": res.metrics, "per_class": res.per_class, "protocol": res.protocol,
               "primary": cls.primary, "figures": {}, "class_names": list(data.class_names),
               **protocol_record(task_obj, task), "params": _count_params(_module), "per_image_file": None}
        os.makedirs(out_dir, exist_ok=True)
        if res.per_image:
            out["per_image_file"] = f"eval_{task}_per_image.npz"
            save_npz({k: np.asarray(v) for k, v in res.per_image.items()}, os.path.join(out_dir, out["per_image_file"]))
        for fname, png in (res.figures or {}).items():
            fpath = os.path.join(out_dir, f"{task}_{fname}")
            ckpt.atomic_write_bytes(fpath, lambda fh, b=png: fh.write(b))
            out["figures"][fname] = fpath
        ckpt.save_json(out, path)
        results[task] = out
    return results


def eval_spec(cfg: BenchConfig, method: str | None, n_pretrain: int) -> dict:
    """What ``bench.evaluate.evaluate_method`` needs (plain data); ``method=None`` for the untrained baseline."""
    c = cfg
    spec = {
        "backbone": to_dict(c.backbone_for(method) if method else c.backbone), "seed": c.run.seed, "eval_dataset": c.run.eval_dataset(),
        "eval_dataset_cfg": to_dict(c.data[c.run.eval_dataset()]),
        "tasks": {t: to_dict(c.tasks[t]) for t in c.run.tasks}, "n_pretrain_images": n_pretrain,
    }
    if method:
        spec["method_cfg"] = to_dict(c.methods[method])
        spec["pretrain"] = to_dict(c.pretrain_for(method))
        spec["pretrain_dataset"] = c.run.pretrain_dataset()
    return spec
