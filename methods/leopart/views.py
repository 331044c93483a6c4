"""Leopart's view recipe ``leopart_multicrop`` (``src/leopart_transforms.py``): multi-crop (2 global + local crops,
no flip) in which every crop overlaps every global crop, so each crop pair has an intersection to align."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bench.data.views import MultiCrop, MultiCropSpec, sample_box
from bench.registry import VIEW_RECIPES


@dataclass
class LeopartViewSpec(MultiCropSpec):
    """Multi-crop whose crops each overlap every global crop (``src/leopart_transforms.py``)."""

    recipe: str = "leopart_multicrop"
    min_intersection: float = 0.01  # of the image area, between each crop and every global crop
    min_intersection_globals: float = 0.02  # between the global crops
    max_tries: int = 100


def _area_inter(a: tuple, b: tuple) -> float:
    """Boxes (top, left, h, w) -> intersection area in pixels."""
    t, l = max(a[0], b[0]), max(a[1], b[1])
    bt, r = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return float(max(bt - t, 0) * max(r - l, 0))


class LeopartViews(MultiCrop):
    """Multi-crop views with the overlap constraint; same sample dict as ``multicrop``."""

    def _boxes(self, h: int, w: int) -> list[tuple]:
        spec = self.spec
        area = float(h * w)
        boxes: list[tuple] = []
        for v in range(spec.n_views):
            is_global = v < spec.n_global
            scale = spec.global_scale if is_global else spec.local_scale
            need = spec.min_intersection_globals if is_global else spec.min_intersection
            for _ in range(max(spec.max_tries, 1)):
                box = sample_box(h, w, scale, spec.ratio)
                if all(_area_inter(box, g) > need * area for g in boxes[:spec.n_global]):
                    break
            boxes.append(box)
        return boxes

    def __call__(self, image: torch.Tensor) -> dict:
        spec = self.spec
        _, h, w = image.shape
        views, boxes, flips = [], [], []
        for v, (top, left, bh, bw) in enumerate(self._boxes(h, w)):
            is_global = v < spec.n_global
            size = spec.global_size if is_global else spec.local_size
            crop = TF.resized_crop(image, top, left, bh, bw, [size, size],
                                   interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
            flip = bool(spec.flip_p > 0 and torch.rand(()) < spec.flip_p)
            if flip:
                crop = TF.horizontal_flip(crop)
            slot = min(v, 1) if is_global else 2
            crop = self._photometric(crop, spec.blur_p[slot], spec.solarize_p[slot], size)
            views.append((crop.float() / 255.0 - self.mean) / self.std)
            boxes.append([float(left), float(top), float(left + bw), float(top + bh)])
            flips.append(flip)
        return {"views": views, "boxes": torch.tensor(boxes, dtype=torch.float32),
                "flips": torch.tensor(flips, dtype=torch.bool), "size": torch.tensor([h, w], dtype=torch.long)}


VIEW_RECIPES.register("leopart_multicrop")(LeopartViews)
