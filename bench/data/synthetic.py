"""The built-in dataset: procedurally rendered scenes, deterministic from a seed.

Each scene is a Voronoi partition into "stuff" regions, each filled with a texture class (its frequency
and phase random), with 1–3 "thing" shapes on top (solid colour with faint noise) that carry
instance masks and boxes. Colours never identify a class: a class is its texture or its shape, so a
linear probe on raw pixels does poorly while features that understand local structure do well.

Two knobs set how much colour varies as a nuisance: ``saturation`` (0 = grey levels) and ``tones`` (0 = every
texture drawn in the same dark and light tone, so texture alone tells regions apart). Both default to 0; the
colourful variant (``saturation=1, tones=1``) is harder than a few CPU minutes of pretraining can address.

Classes (10): 7 stuff textures then 3 things. Thing instances use COCO category ids 1..3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench.data import SegDataset, scene_store
from bench.errors import BenchError
from bench.registry import DATASETS

STUFF = ["noise", "hstripes", "vstripes", "dstripes", "checker", "dots", "waves"]
THINGS = ["disk", "square", "triangle"]


@dataclass
class SyntheticConfig:
    size: int = 96  # image side in pixels
    num_train: int = 1536
    num_val: int = 192
    seed: int = 0
    regions: tuple = (2, 4)  # stuff regions per image, inclusive range
    things: tuple = (1, 3)  # thing instances per image, inclusive range
    # Colour is a pure nuisance here (it never identifies a class) and it dominates an untrained ViT's patch tokens,
    # which no CPU-minutes pretraining undoes: with random colours (saturation=1, tones=1) every method probed at or
    # below random-init (11 mIoU). Grey scenes in fixed tones leave texture and shape as the only cues.
    saturation: float = 0.0  # colour saturation of every region (0 = grey levels only, 1 = fully random colours)
    tones: float = 0.0  # 0 = every texture in the same dark/light tones; 1 = every region's two tones random
    # keep rendered scenes: on disk, one file per split that every process of a run reads (bench/data/scene_store.py,
    # BENCH_DATA_CACHE=off keeps them in this process's memory only); false renders every access
    cache: bool = True

    def validate(self, where: str) -> None:
        if self.size < 32:
            raise BenchError(f"{where}.size: expected at least 32 pixels, got {self.size}")
        if not 0.0 <= self.tones <= 1.0:
            raise BenchError(f"{where}.tones: expected a number in [0, 1], got {self.tones}")
        if self.saturation < 0:
            raise BenchError(f"{where}.saturation: expected a non-negative number, got {self.saturation}")
        if self.num_train < 1 or self.num_val < 1:
            raise BenchError(f"{where}: num_train and num_val must be positive")


def _texture(cls: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Returns an H×W map in [0, 1] for stuff class ``cls``."""
    period = rng.uniform(5.0, 10.0)
    phase = rng.uniform(0, 2 * np.pi)
    name = STUFF[cls]
    if name == "noise":
        t = rng.random(yy.shape)
    elif name == "hstripes":
        t = (np.sin(2 * np.pi * yy / period + phase) > 0).astype(np.float32)
    elif name == "vstripes":
        t = (np.sin(2 * np.pi * xx / period + phase) > 0).astype(np.float32)
    elif name == "dstripes":
        sign = rng.choice([-1.0, 1.0])
        t = (np.sin(2 * np.pi * (xx + sign * yy) / (period * 1.41) + phase) > 0).astype(np.float32)
    elif name == "checker":
        p = period / 2 + 1
        t = ((np.floor((xx + phase) / p) + np.floor((yy + phase) / p)) % 2).astype(np.float32)
    elif name == "dots":
        p = period + 2
        cx = (xx + phase) % p - p / 2
        cy = (yy + phase) % p - p / 2
        t = (cx ** 2 + cy ** 2 < (p / 3.2) ** 2).astype(np.float32)
    else:  # waves: smooth sinusoid, no hard edges
        t = 0.5 + 0.5 * np.sin(2 * np.pi * yy / (period * 1.5) + 2.0 * np.sin(2 * np.pi * xx / (period * 3)) + phase)
    return t.astype(np.float32)


def _colour(rng: np.random.Generator, saturation: float = 1.0, tones: float = 1.0, base: float = 0.5) -> np.ndarray:
    rgb = rng.uniform(0.05, 0.95, size=3).astype(np.float32)
    rgb = np.float32(tones) * rgb + np.float32(1 - tones) * np.float32(base)
    grey = np.float32(rgb.mean())
    return grey + np.float32(saturation) * (rgb - grey)


def thing_mask(kind: str, s: float, cy: float, cx: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """H×W bool mask of a thing of side / diameter ``s`` pixels centred at (cy, cx) (also the video scenes')."""
    if kind == "disk":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= (s / 2) ** 2
    if kind == "square":
        return (np.abs(yy - cy) <= s / 2) & (np.abs(xx - cx) <= s / 2)
    top, bottom = cy - s / 2, cy + s / 2  # upright triangle
    half = (yy - top) / s * (s / 2)
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)


def render_scene(seed: int, size: int, regions=(2, 4), things=(1, 3), saturation: float = 0.0,
                 tones: float = 0.0) -> dict:
    """One scene: ``image`` H×W×3 uint8, ``mask`` H×W int64 class ids, ``instances`` list."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    n_reg = int(rng.integers(regions[0], regions[1] + 1))
    centres = rng.uniform(0, size, size=(n_reg, 2))
    dist = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    region = dist.argmin(0)
    image = np.zeros((size, size, 3), np.float32)
    mask = np.zeros((size, size), np.int64)
    classes = rng.choice(len(STUFF), size=n_reg, replace=n_reg > len(STUFF))
    for r in range(n_reg):
        sel = region == r
        t = _texture(int(classes[r]), rng, yy, xx)[..., None]
        c0, c1 = _colour(rng, saturation, tones, 0.2), _colour(rng, saturation, tones, 0.8)
        while np.abs(c0 - c1).sum() < 0.6:  # keep textures visible
            c1 = _colour(rng, saturation, tones, 0.8)
        image[sel] = (c0 * (1 - t) + c1 * t)[sel]
        mask[sel] = int(classes[r])
    instances = []
    n_things = int(rng.integers(things[0], things[1] + 1))
    for _ in range(n_things):
        k = int(rng.integers(len(THINGS)))
        s = rng.uniform(0.16, 0.38) * size
        cy, cx = rng.uniform(s / 2, size - s / 2, size=2)
        m = thing_mask(THINGS[k], s, cy, cx, yy, xx)
        # later things occlude earlier ones: their visible masks shrink
        for inst in instances:
            inst["mask"] &= ~m
        colour = _colour(rng, saturation, tones, 0.5)
        image[m] = colour + rng.normal(0, 0.03, size=(int(m.sum()), 3)).astype(np.float32)
        mask[m] = len(STUFF) + k
        instances.append({"category_id": k + 1, "mask": m.copy()})
    kept = []
    for inst in instances:
        m = inst["mask"]
        if m.sum() < 16:
            continue
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        inst["bbox"] = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
        inst["area"] = float(m.sum())
        inst["iscrowd"] = 0
        kept.append(inst)
    image = np.clip(image, 0, 1)
    return {"image": (image * 255).round().astype(np.uint8), "mask": mask, "instances": kept}


@DATASETS.register("synthetic")
class SyntheticScenes(SegDataset):
    """Deterministic synthetic scenes; train and val use disjoint seed ranges."""

    config_class = SyntheticConfig
    num_classes = len(STUFF) + len(THINGS)
    class_names = STUFF + THINGS
    thing_classes = THINGS
    has_instances = True

    def __init__(self, cfg: SyntheticConfig, split: str):
        if split not in ("train", "val"):
            raise BenchError(f"synthetic: unknown split '{split}'; valid: train, val")
        self.cfg = cfg
        self.split = split
        self.n = cfg.num_train if split == "train" else cfg.num_val
        # disjoint seed ranges per split; the dataset seed shifts both
        self.base = cfg.seed * 10_000_000 + (0 if split == "train" else 5_000_000)
        self._cache: dict[int, dict] = {}
        self._arrays = None  # the split from the disk store (bench/data/scene_store.py), loaded on first use

    def __len__(self) -> int:
        return self.n

    def _render(self, index: int) -> dict:
        scene = render_scene(self.base + index, self.cfg.size, tuple(self.cfg.regions), tuple(self.cfg.things),
                             self.cfg.saturation, self.cfg.tones)
        scene["mask"] = scene["mask"].astype(np.uint8)  # 10 classes; int64 again on the way out
        return scene

    def _store_path(self) -> str | None:
        settings = {k: v for k, v in vars(self.cfg).items() if k not in ("cache", "num_train", "num_val")}
        return scene_store.store_path({**settings, "n": self.n,
                                       "regions": list(self.cfg.regions), "things": list(self.cfg.things)}, self.split, __file__)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        if self._arrays is None and self.cfg.cache and scene_store.store_dir() is not None:  # once: the split
            self._arrays = scene_store.materialize(self._store_path(), self.n, self.cfg.size, self._render)
        scene = scene_store.unpack(self._arrays, index) if self._arrays is not None else self._cache.get(index)
        if scene is None:
            scene = self._render(index)
            if self.cfg.cache:
                self._cache[index] = scene
        # copies: a consumer that edits its sample in place must not change the cached scene
        return {
            "index": index,
            "image": torch.from_numpy(scene["image"]).permute(2, 0, 1).contiguous(),
            "mask": torch.from_numpy(scene["mask"]).long(),
            "instances": [dict(inst, mask=inst["mask"].copy()) for inst in scene["instances"]],
        }

