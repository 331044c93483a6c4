"""``davis17`` on a miniature DAVIS-2017 tree (JPEGImages/480p, palette Annotations/480p, ImageSets/2017)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from bench.data import build_dataset
from bench.data.davis import Davis17Config
from bench.errors import BenchError


def _palette_png(arr, path):
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255, 255, 255] * 253)
    im.save(path)


def _tree(root, seqs=("bear", "car"), frames=3):
    base = os.path.join(root, "DAVIS")
    os.makedirs(os.path.join(base, "ImageSets", "2017"))
    with open(os.path.join(base, "ImageSets", "2017", "val.txt"), "w") as fh:
        fh.write("\n".join(seqs) + "\n")
    for s, seq in enumerate(seqs):
        os.makedirs(os.path.join(base, "JPEGImages", "480p", seq))
        os.makedirs(os.path.join(base, "Annotations", "480p", seq))
        for t in range(frames):
            Image.fromarray(np.full((12, 16, 3), 30 * t, np.uint8)).save(
                os.path.join(base, "JPEGImages", "480p", seq, f"{t:05d}.jpg"))
            lab = np.zeros((12, 16), np.uint8)
            lab[2:6, t:t + 4] = 1
            if s == 1:
                lab[7:10, 8:12] = 2
                lab[0, :] = 255  # void
            _palette_png(lab, os.path.join(base, "Annotations", "480p", seq, f"{t:05d}.png"))
    return base


def test_loader_reads_the_layout(tmp_path):
    _tree(str(tmp_path))
    ds = build_dataset("davis17", Davis17Config(root=str(tmp_path)), "val")  # parent of DAVIS/ works
    assert len(ds) == 2 and ds.is_video
    a, b = ds[0], ds[1]
    assert a["name"] == "bear" and a["frames"].shape == (3, 3, 12, 16) and a["masks"].shape == (3, 12, 16)
    assert a["num_objects"] == 1 and b["num_objects"] == 2
    assert a["masks"][2, 3].tolist()[:7] == [0, 0, 1, 1, 1, 1, 0]  # palette indices, the object moved
    assert b["masks"][0, 0].unique().tolist() == [255]  # void kept
    assert int(a["frames"][1].float().mean().round()) == 30
    one = build_dataset("davis17", Davis17Config(root=str(tmp_path), max_sequences=1), "val")
    assert len(one) == 1


def test_layout_errors_are_one_line(tmp_path):
    with pytest.raises(BenchError, match="data.davis17.root: not set"):
        build_dataset("davis17", Davis17Config(), "val")
    (tmp_path / "x").mkdir()
    with pytest.raises(BenchError, match="JPEGImages") as err:
        build_dataset("davis17", Davis17Config(root=str(tmp_path / "x")), "val")
    assert "\n" not in str(err.value)
    base = _tree(str(tmp_path / "t"))
    with pytest.raises(BenchError, match="train.txt"):  # the tree has only the val list
        build_dataset("davis17", Davis17Config(root=base), "train")
    with open(os.path.join(base, "ImageSets", "2017", "val.txt"), "a") as fh:
        fh.write("missing-seq\n")
    with pytest.raises(BenchError, match="missing-seq"):
        build_dataset("davis17", Davis17Config(root=base), "val")
    from bench.config import build

    with pytest.raises(BenchError, match="resolution"):
        build(Davis17Config, {"root": base, "resolution": "720p"}, "data.davis17")
