"""Detection and instance segmentation fine-tuning (protocols.md §3, §4.5).

- ``coco``: COCO-format ground truth from any dataset with ``instances``, detections to COCO results, and
  the pycocotools ``COCOeval`` wrapper returning the named stats vector.
- ``torchvision_backend``: Mask R-CNN / Faster R-CNN from torchvision on a ``DenseBackbone`` (FPN on ResNet
  stages, ViTDet simple feature pyramid on ViTs), fine-tuned end to end.
- ``d2_convert``: backbone weights <-> the detectron2 weights pickle (§3.1; ViTDet renaming §3.7).
- ``d2_config``: detectron2 YAML configs for the protocol's families (§3.2, §3.3) and the launch script.
- ``d2_backend``: the ``det`` task's detectron2 backend (export, config, subprocess, metrics back).
- ``export``: the ``bench export --format detectron2`` package (pickle, configs, launch scripts).
- ``d2_train``: the detectron2 training entry point (``python -m tasks.detection.d2_train``); it is the only
  module that imports detectron2 and is never imported by the harness itself.
"""

from __future__ import annotations

import importlib.util

from bench.errors import BenchError

D2_INSTALL = ("pip install 'git+https://github.com/facebookresearch/detectron2.git' (it is not on PyPI; "
              "needs a matching torch and a compiler)")


def require_detectron2(where: str = "tasks.det") -> None:
    """Fail fast, in one line, when the detectron2 backend is asked for and detectron2 is not importable."""
    if importlib.util.find_spec("detectron2") is None:
        raise BenchError(f"{where}.backend=detectron2: detectron2 is not installed; install it with {D2_INSTALL}, "
                         f"or use the default backend (tasks.det.backend=torchvision)")
