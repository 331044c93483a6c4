"""``davis17``: DAVIS-2017 semi-supervised video object segmentation (protocols.md §7.3), read in place.

Layout (the official trainval download, unchanged): ``<root>/JPEGImages/480p/<seq>/00000.jpg``,
``<root>/Annotations/480p/<seq>/00000.png`` (palette PNGs: index = object id, 0 = background, 255 = void),
``<root>/ImageSets/2017/{train,val}.txt`` (one sequence name per line). ``root`` may also be a parent holding
``DAVIS/``. Splits: val (30 sequences) and train (60).

Item (a video; ``is_video = True``): ``frames`` uint8 T×3×H×W, ``masks`` int64 T×H×W (object ids, 255 void),
``num_objects`` (the largest id in the first frame's annotation: DAVIS numbers the objects 1..N), ``name``;
``image`` / ``mask`` repeat the first frame. A frame without an annotation PNG (the test splits) gets an
all-void mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from bench.data import IGNORE_INDEX, SegDataset
from bench.data._real import read_image, read_label_png, read_list, require_dir, require_file, require_root
from bench.errors import BenchError
from bench.registry import DATASETS


@dataclass
class Davis17Config:
    root: str = ""  # the DAVIS folder (JPEGImages/, Annotations/, ImageSets/) or its parent
    resolution: str = "480p"  # 480p | Full-Resolution
    max_sequences: int = 0  # 0 = every sequence of the split list

    def validate(self, where: str) -> None:
        if self.resolution not in ("480p", "Full-Resolution"):
            raise BenchError(f"{where}.resolution: unknown value '{self.resolution}'; valid: 480p, Full-Resolution")
        if self.max_sequences < 0:
            raise BenchError(f"{where}.max_sequences: expected >= 0 (0 = all), got {self.max_sequences}")


def find_davis_root(name: str, root: str) -> str:
    root = require_root(name, root, "the DAVIS-2017 folder (JPEGImages/480p/, Annotations/480p/, ImageSets/2017/)")
    for base in (root, os.path.join(root, "DAVIS")):
        if os.path.isdir(os.path.join(base, "JPEGImages")):
            return base
    raise BenchError(f"data.{name}: expected folder {os.path.join(root, 'JPEGImages')} (DAVIS-2017 layout: "
                     f"JPEGImages/480p/<seq>/, Annotations/480p/<seq>/, ImageSets/2017/val.txt)")


@DATASETS.register("davis17")
class Davis17(SegDataset):
    config_class = Davis17Config
    is_video = True
    num_classes = 0  # objects are per sequence, not classes
    class_names: list = []
    expected_sizes = {"train": 60, "val": 30}

    def __init__(self, cfg: Davis17Config, split: str):
        name = "davis17"
        if split not in ("train", "val"):
            raise BenchError(f"davis17: unknown split '{split}'; valid: train, val")
        base = find_davis_root(name, cfg.root)
        img_root = require_dir(name, os.path.join(base, "JPEGImages", cfg.resolution), f"{cfg.resolution} frames")
        ann_root = require_dir(name, os.path.join(base, "Annotations", cfg.resolution),
                               f"{cfg.resolution} palette annotations")
        seqs = read_list(require_file(name, os.path.join(base, "ImageSets", "2017", f"{split}.txt"),
                                      f"DAVIS-2017 {split} sequence list"))
        if cfg.max_sequences:
            seqs = seqs[:cfg.max_sequences]
        if not seqs:
            raise BenchError(f"data.{name}: ImageSets/2017/{split}.txt lists no sequences")
        self.split = split
        self.sequences = []
        for seq in seqs:
            folder = os.path.join(img_root, seq)
            if not os.path.isdir(folder):
                raise BenchError(f"data.{name}: expected folder {folder} (frames of sequence '{seq}' listed in "
                                 f"ImageSets/2017/{split}.txt)")
            frames = sorted(f for f in os.listdir(folder) if f.endswith(".jpg"))
            if not frames:
                raise BenchError(f"data.{name}: no .jpg frames in {folder}")
            first = os.path.join(ann_root, seq, frames[0][:-4] + ".png")
            require_file(name, first, f"first-frame annotation of sequence '{seq}'")
            self.sequences.append((seq, [os.path.join(folder, f) for f in frames],
                                   [os.path.join(ann_root, seq, f[:-4] + ".png") for f in frames]))
        self.notes = [f"layout {base}: {len(self.sequences)} {split} sequences at {cfg.resolution}"]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.sequences):
            raise IndexError(index)
        seq, frame_paths, ann_paths = self.sequences[index]
        frames, masks = [], []
        for fp, ap in zip(frame_paths, ann_paths):
            img = read_image(fp)
            lab = read_label_png(ap) if os.path.isfile(ap) else np.full(img.shape[:2], IGNORE_INDEX, np.uint8)
            if lab.shape != img.shape[:2]:
                raise BenchError(f"{ap}: annotation is {lab.shape[0]}x{lab.shape[1]} but frame {fp} is "
                                 f"{img.shape[0]}x{img.shape[1]}")
            frames.append(torch.from_numpy(img).permute(2, 0, 1))
            masks.append(torch.from_numpy(lab.astype(np.int64)))
        frames_t, masks_t = torch.stack(frames), torch.stack(masks)
        ids = [int(v) for v in torch.unique(masks_t[0]).tolist() if 0 < v < IGNORE_INDEX]
        return {"index": index, "name": seq, "frames": frames_t, "masks": masks_t,
                "num_objects": max(ids) if ids else 0, "image": frames_t[0], "mask": masks_t[0]}
