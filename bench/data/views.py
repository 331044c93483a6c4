"""Multi-crop views with geometry: each crop's box in the source image and its flip flag.

A method declares a view spec (``Method.view_spec()``); ``VIEW_RECIPES.get(spec.recipe)(spec)`` builds a
callable ``image (uint8 3×H×W) -> sample dict``. The ``multicrop`` recipe (DINO / CLoVE / CrOC / Leopart)
returns::

    views  list of V float tensors 3×s_v×s_v, normalised (global crops first, then locals)
    boxes  V×4 float, (x0, y0, x1, y1) of each crop in source-image pixels (x1, y1 exclusive)
    flips  V bool, True where the crop was mirrored after cropping
    size   2 int, (H, W) of the source image

in continuous pixel coordinates (pixel l covers [l, l+1)): crop pixel column j of a view of side s has its
centre at source x = x0 + (j + 0.5)·(x1 − x0)/s, or x0 + (s − j − 0.5)·(x1 − x0)/s when flipped;
``methods/common/geometry.py`` does that arithmetic once for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from bench.data import IMAGENET_MEAN, IMAGENET_STD
from bench.registry import VIEW_RECIPES


# Colour jitter (brightness, contrast, saturation, hue) at strength 1 in the two families of recipes.
BYOL_JITTER = (0.4, 0.4, 0.2, 0.1)  # DINO, BYOL, CrOC, CLoVE
SWAV_JITTER = (0.8, 0.8, 0.8, 0.2)  # SwAV, ViCE, Leopart


def scaled_jitter(reference: tuple, strength: float) -> tuple:
    """A reference jitter at ``strength`` (1 = the reference, 0 = none): every factor scaled alike."""
    return tuple(strength * x for x in reference)


@dataclass
class MultiCropSpec:
    """DINO-style multi-crop; sizes are in pixels, scales are fractions of the source area."""

    recipe: str = "multicrop"
    n_global: int = 2
    global_size: int = 64
    global_scale: tuple = (0.4, 1.0)
    n_local: int = 0
    local_size: int = 32
    local_scale: tuple = (0.05, 0.4)
    ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple = BYOL_JITTER  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple = (1.0, 0.1, 0.5)  # global crop 1, global crop 2, local crops
    blur_sigma: tuple = (0.1, 2.0)  # Gaussian blur σ range in pixels of a blur_ref_size-px crop
    # σ is scaled by crop side / blur_ref_size (224: today's CPU default, so small crops are not wiped out);
    # 0: σ in the crop's own pixels, as the references (PIL/torchvision blur after the resize)
    blur_ref_size: int = 224
    solarize_p: tuple = (0.0, 0.2, 0.0)  # global crop 1, global crop 2, local crops
    same_box_for_globals: bool = False  # CrOC-style: both global crops share one box (different photometrics)

    @property
    def n_views(self) -> int:
        return self.n_global + self.n_local


def sample_box(h: int, w: int, scale: tuple, ratio: tuple) -> tuple[int, int, int, int]:
    """RandomResizedCrop box (top, left, height, width) in source pixels, torchvision's sampler."""
    dummy = torch.empty(1, h, w)
    return v2.RandomResizedCrop.get_params(dummy, list(scale), list(ratio))  # type: ignore[arg-type]


class MultiCrop:
    """Callable view pipeline for a :class:`MultiCropSpec`."""

    def __init__(self, spec: MultiCropSpec):
        self.spec = spec
        self.jitter = v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p)
        self.gray = v2.RandomGrayscale(p=spec.grayscale_p)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def _photometric(self, crop: torch.Tensor, blur_p: float, solarize_p: float, size: int) -> torch.Tensor:
        crop = self.gray(self.jitter(crop))
        if blur_p > 0 and torch.rand(()) < blur_p:
            lo, hi = self.spec.blur_sigma
            sigma = float(torch.empty(()).uniform_(lo, hi))
            if self.spec.blur_ref_size > 0:
                sigma = sigma * size / float(self.spec.blur_ref_size)
            if sigma > 0.05:
                k = max(3, 2 * math.ceil(3 * sigma) + 1)
                crop = F.gaussian_blur(crop, [k, k], [sigma, sigma])
        if solarize_p > 0 and torch.rand(()) < solarize_p:
            crop = F.solarize(crop, 128)
        return crop

    def __call__(self, image: torch.Tensor) -> dict:
        spec = self.spec
        _, h, w = image.shape
        views, boxes, flips = [], [], []
        shared = sample_box(h, w, spec.global_scale, spec.ratio) if spec.same_box_for_globals else None
        for v in range(spec.n_views):
            is_global = v < spec.n_global
            size = spec.global_size if is_global else spec.local_size
            top, left, bh, bw = shared if (is_global and shared) else sample_box(
                h, w, spec.global_scale if is_global else spec.local_scale, spec.ratio)
            crop = F.resized_crop(image, top, left, bh, bw, [size, size],
                                  interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
            flip = bool(torch.rand(()) < spec.flip_p)
            if flip:
                crop = F.horizontal_flip(crop)
            slot = min(v, 1) if is_global else 2  # global 1, global 2 (and further globals), locals
            crop = self._photometric(crop, spec.blur_p[slot], spec.solarize_p[slot], size)
            crop = (crop.float() / 255.0 - self.mean) / self.std
            views.append(crop)
            boxes.append([float(left), float(top), float(left + bw), float(top + bh)])
            flips.append(flip)
        return {
            "views": views,
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "flips": torch.tensor(flips, dtype=torch.bool),
            "size": torch.tensor([h, w], dtype=torch.long),
        }


VIEW_RECIPES.register("multicrop")(MultiCrop)


def collate_views(samples: list[dict]) -> dict:
    """Stack per-sample dicts: lists of tensors become lists of batched tensors (one per view)."""
    out: dict = {}
    for key in samples[0]:
        first = samples[0][key]
        if isinstance(first, list) and first and isinstance(first[0], torch.Tensor):
            out[key] = [torch.stack([s[key][i] for s in samples]) for i in range(len(first))]
        elif isinstance(first, torch.Tensor):
            out[key] = torch.stack([s[key] for s in samples])
        elif isinstance(first, (int, float)):
            out[key] = torch.tensor([s[key] for s in samples])
        else:
            out[key] = [s[key] for s in samples]
    return out


def build_view_transform(spec) -> object:
    return VIEW_RECIPES.get(spec.recipe)(spec)


class PretrainViews(torch.utils.data.Dataset):
    """A dataset's images through a view recipe. Recipes that need the dense label or instance data
    (none of the built-in ones) can read them from ``item``; the default passes the image only."""

    def __init__(self, dataset, transform):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        sample = self.transform(item["image"])
        sample["index"] = index
        return sample
