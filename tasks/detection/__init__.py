"""Detection and instance segmentation fine-tuning (protocols.md §3, §4.5).

- ``coco``: COCO-format ground truth from any dataset with ``instances``, detections to COCO results, and
  the pycocotools ``COCOeval`` wrapper returning the named stats vector.
- ``torchvision_backend``: Mask R-CNN / Faster R-CNN from torchvision on a ``DenseBackbone`` (FPN on ResNet
  stages, ViTDet simple feature pyramid on ViTs), fine-tuned end to end.
- ``d2_convert``: backbone weights <-> the detectron2 weights pickle (§3.1; ViTDet renaming §3.7).
- ``d2_config``: detectron2 YAML configs for the protocol's families (§3.2, §3.3) and the launch script.
- ``d2_backend``: the ``det`` task's detectron2 backend (export, config, subprocess, metrics back).
- ``d2_train``: the detectron2 training entry point (``python -m tasks.detection.d2_train``); it is the only
  module that imports detectron2 and is never imported by the harness itself.
"""
