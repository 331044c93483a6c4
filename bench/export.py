"""``bench export --format detectron2 --run RUN --method NAME -o model.pkl``.

Reads ``<storage>/<run>/<method>/final.pt`` (``random-init``: the untrained backbone of seed ``run.seed``),
takes the method's evaluation backbone (``Method.eval_backbone()``, e.g. DINO's teacher) and writes:

- ResNets: ``model.pkl``, the detectron2 weights pickle of protocols.md §3.1 (``{"model", "__author__",
  "matching_heuristics": True}``, detectron2 key names, NumPy arrays); next to it one YAML config per
  detectron2 family (``model.<family>.yaml``: R50-C4 and R50-FPN 1x COCO, Cityscapes R50-FPN, VOC C4, each
  with the §3.2 overrides and ``MODEL.WEIGHTS`` pointing at the pickle; C4 families only for depth >= 50)
  and a launch script per config (``model.<family>.sh``).
- patch-16 ViTs: the ViTDet weights pickle (§3.7), a LazyConfig ``model.vitdet_mask_rcnn.py`` and its
  launch script. Other ViTs: a clear error (detectron2's simple feature pyramid needs patch 16).

The backbone architecture is ``--backbone`` when given, else inferred from the checkpoint: the registered
backbone whose tensor names and shapes equal the evaluation backbone's tensors in ``final.pt``.
"""

from __future__ import annotations

import os

import torch

from bench import checkpoint as ckpt
from bench.backbones import DenseBackbone, create_backbone
from bench.errors import BenchError

FORMATS = ("detectron2",)
BASELINE = "random-init"


def _backbone_shapes(name: str) -> dict:
    with torch.device("meta"):
        model = create_backbone(name).model
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_backbone(state: dict, prefix: str) -> str:
    """The registered backbone whose ``model.*`` tensors match ``state[prefix + 'model.*']`` exactly."""
    from bench.registry import BACKBONES

    sub = {k[len(prefix) + len("model."):]: tuple(v.shape) for k, v in state.items()
           if k.startswith(prefix + "model.")}
    for name in BACKBONES.names():
        if _backbone_shapes(name) == sub:
            return name
    raise BenchError(f"export: the checkpoint's backbone ({len(sub)} tensors) matches no registered backbone; "
                     f"pass --backbone NAME")


def load_eval_backbone(storage: str, run_id: str, method: str, backbone: str | None, cfg) -> DenseBackbone:
    """The trained evaluation backbone of ``method`` in run ``run_id`` (CPU, eval mode)."""
    from methods.build import eval_backbone_prefix

    run_dir = os.path.join(storage, run_id)
    if not os.path.isdir(run_dir):
        raise BenchError(f"--run {run_id}: {run_dir} not found (--storage {storage})")
    if method == BASELINE:
        torch.manual_seed(cfg.run.seed)  # the same untrained weights as the run's random-init row
        return create_backbone(backbone or cfg.backbone.name).eval()
    final = os.path.join(run_dir, method, "final.pt")
    if not os.path.isfile(final):
        done = sorted(d for d in os.listdir(run_dir) if os.path.isfile(os.path.join(run_dir, d, "final.pt")))
        raise BenchError(f"--method {method}: {final} not found; finished pretrainings in run {run_id}: "
                         f"{', '.join(done) or 'none'}")
    state = ckpt.load_torch(final)
    name = state.get("method", method)
    if name != method:
        raise BenchError(f"--method {method}: {final} holds method '{name}'")
    from bench.config import to_dict

    method_cfg = to_dict(cfg.methods[method]) if method in cfg.methods else {}
    prefix = eval_backbone_prefix(state, method_cfg, cfg.backbone.name)
    weights = state["method_state"]
    backbone = backbone or infer_backbone(weights, prefix)
    target = create_backbone(backbone)
    sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    expected = target.state_dict()
    bad = [k for k in expected if k not in sub or tuple(sub[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise BenchError(f"--backbone {backbone}: does not match the checkpoint ({len(bad)} tensors differ, e.g. "
                         f"'{bad[0]}'); use the backbone the run was trained with")
    target.load_state_dict({k: sub[k] for k in expected})
    return target.eval()


def export(fmt: str, storage: str, run_id: str, method: str, output: str, backbone: str | None, cfg,
           gpus: int = 8) -> list[str]:
    if fmt not in FORMATS:
        raise BenchError(f"--format {fmt}: unknown; valid: {', '.join(FORMATS)}")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise BenchError(f"-o {output}: folder {folder} does not exist")
    net = load_eval_backbone(storage, run_id, method, backbone, cfg)
    from tasks.detection.export import export_detectron2

    return export_detectron2(net, output, gpus)
