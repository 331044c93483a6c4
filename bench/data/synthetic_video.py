"""``synthetic_video``: short clips of the synthetic scenes with their things moving, for the ``vos`` task.

Each clip is a static synthetic background (bench/data/synthetic.py's stuff textures, rendered without things)
with 1–3 things (disk, square, triangle: the same shapes and tones as the image scenes) that move in straight
lines at ``speed`` pixels per frame and bounce off the borders; later things occlude earlier ones. Deterministic
from the seed; train and val use disjoint seed ranges.

Item (a video; ``is_video = True``): ``frames`` uint8 T×3×H×W, ``masks`` int64 T×H×W object ids (0 =
background, 1..N = things in drawing order), ``num_objects`` N, ``name``; ``image`` / ``mask`` repeat the first
frame so image-level helpers (feature figures) can read a video dataset too. Every object covers at least 16
pixels in the first frame (it is given there, as in semi-supervised VOS); it may be occluded later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench.data import SegDataset
from bench.data.synthetic import THINGS, _colour, render_scene, thing_mask
from bench.errors import BenchError
from bench.registry import DATASETS


@dataclass
class SyntheticVideoConfig:
    size: int = 96  # frame side in pixels
    frames: int = 8  # frames per clip
    num_train: int = 8  # clips (vos reads only val; the train split exists for the registry's contract)
    num_val: int = 16
    speed: tuple = (1.0, 3.0)  # pixels per frame, inclusive range
    things: tuple = (1, 3)  # moving objects per clip
    regions: tuple = (2, 4)  # background stuff regions
    saturation: float = 0.0  # as data.synthetic
    tones: float = 0.0
    seed: int = 0

    def validate(self, where: str) -> None:
        if self.size < 32:
            raise BenchError(f"{where}.size: expected at least 32 pixels, got {self.size}")
        if self.frames < 2:
            raise BenchError(f"{where}.frames: expected at least 2 frames per clip, got {self.frames}")
        if self.num_train < 1 or self.num_val < 1:
            raise BenchError(f"{where}: num_train and num_val must be positive")
        if not 1 <= self.things[0] <= self.things[1]:
            raise BenchError(f"{where}.things: expected an inclusive range [lo, hi] with 1 <= lo <= hi")
        if self.speed[0] < 0 or self.speed[1] < self.speed[0]:
            raise BenchError(f"{where}.speed: expected an inclusive range [lo, hi] with 0 <= lo <= hi")


def render_clip(seed: int, size: int, frames: int, things=(1, 3), speed=(1.0, 3.0), regions=(2, 4),
                saturation: float = 0.0, tones: float = 0.0) -> dict:
    """One clip: ``frames`` T×H×W×3 uint8, ``masks`` T×H×W int64 (0 = background, 1..N objects)."""
    rng = np.random.default_rng(seed)
    background = render_scene(int(rng.integers(2 ** 31)), size, tuple(regions), (0, 0), saturation, tones)
    bg = background["image"].astype(np.float32) / 255.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    objects = []
    for _ in range(int(rng.integers(things[0], things[1] + 1))):
        s = float(rng.uniform(0.2, 0.38) * size)
        pos = rng.uniform(s / 2, size - s / 2, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        vel = rng.uniform(speed[0], speed[1]) * np.array([np.sin(angle), np.cos(angle)])
        objects.append({"kind": THINGS[int(rng.integers(len(THINGS)))], "s": s, "pos": pos, "vel": vel,
                        "colour": _colour(rng, saturation, tones, 0.5)})
    out_frames = np.zeros((frames, size, size, 3), np.uint8)
    out_masks = np.zeros((frames, size, size), np.int64)
    for t in range(frames):
        image = bg.copy()
        ids = np.zeros((size, size), np.int64)
        for j, ob in enumerate(objects):
            if t:  # move, bouncing off the borders
                ob["pos"] = ob["pos"] + ob["vel"]
                for a in range(2):
                    lo, hi = ob["s"] / 2, size - ob["s"] / 2
                    if ob["pos"][a] < lo or ob["pos"][a] > hi:
                        ob["vel"][a] = -ob["vel"][a]
                        ob["pos"][a] = np.clip(ob["pos"][a], lo, hi)
            m = thing_mask(ob["kind"], ob["s"], ob["pos"][0], ob["pos"][1], yy, xx)
            image[m] = ob["colour"] + rng.normal(0, 0.03, size=(int(m.sum()), 3)).astype(np.float32)
            ids[m] = j + 1
        out_frames[t] = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        out_masks[t] = ids
    # objects must be visible in the first frame (the given annotation); renumber the kept ones 1..N
    kept = [j + 1 for j in range(len(objects)) if (out_masks[0] == j + 1).sum() >= 16]
    lut = np.zeros(len(objects) + 1, np.int64)
    lut[kept] = np.arange(1, len(kept) + 1)
    return {"frames": out_frames, "masks": lut[out_masks], "num_objects": len(kept)}


@DATASETS.register("synthetic_video")
class SyntheticVideo(SegDataset):
    """Deterministic synthetic clips (``is_video``); the video counterpart of ``synthetic``."""

    config_class = SyntheticVideoConfig
    is_video = True
    num_classes = 0  # objects are per clip, not classes
    class_names: list = []

    def __init__(self, cfg: SyntheticVideoConfig, split: str):
        if split not in ("train", "val"):
            raise BenchError(f"synthetic_video: unknown split '{split}'; valid: train, val")
        self.cfg = cfg
        self.split = split
        self.n = cfg.num_train if split == "train" else cfg.num_val
        self.base = cfg.seed * 10_000_000 + 7_000_000 + (0 if split == "train" else 1_000_000)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        c = self.cfg
        clip = render_clip(self.base + index, c.size, c.frames, tuple(c.things), tuple(c.speed), tuple(c.regions),
                           c.saturation, c.tones)
        frames = torch.from_numpy(clip["frames"]).permute(0, 3, 1, 2).contiguous()
        masks = torch.from_numpy(clip["masks"])
        return {"index": index, "name": f"clip{index:04d}", "frames": frames, "masks": masks,
                "num_objects": clip["num_objects"], "image": frames[0], "mask": masks[0]}
