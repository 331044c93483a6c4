"""``ade20k`` on a miniature ADEChallengeData2016 tree: reduce_zero_label, splits, and one-line layout errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from bench.data import build_dataset
from bench.data.ade20k import ADE20K_CLASSES, Ade20kConfig, reduce_zero_label_lut
from bench.errors import BenchError


def _tree(root, n_train=4, n_val=2):
    base = os.path.join(root, "ADEChallengeData2016")
    for split, prefix, n in (("training", "train", n_train), ("validation", "val", n_val)):
        os.makedirs(os.path.join(base, "images", split))
        os.makedirs(os.path.join(base, "annotations", split))
        for i in range(n):
            stem = f"ADE_{prefix}_{i + 1:08d}"
            Image.fromarray(np.full((6, 8, 3), 40 * i, np.uint8)).save(os.path.join(base, "images", split, stem + ".jpg"))
            lab = np.array([[0, 1, 2, 150, 151, 255, 0, 1]] * 6, np.uint8)
            Image.fromarray(lab, mode="L").save(os.path.join(base, "annotations", split, stem + ".png"))
    return base


def test_reduce_zero_label_and_splits(tmp_path):
    _tree(str(tmp_path))
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[-1] == "flag"
    lut = reduce_zero_label_lut()
    assert [int(lut[v]) for v in (0, 1, 2, 150, 151, 255)] == [255, 0, 1, 149, 255, 255]
    cfg = Ade20kConfig(root=str(tmp_path))  # the parent of ADEChallengeData2016 works too
    train, val = build_dataset("ade20k", cfg, "train"), build_dataset("ade20k", cfg, "val")
    assert (len(train), len(val), val.num_classes) == (4, 2, 150)
    item = val[1]
    assert item["image"].shape == (3, 6, 8)
    assert item["mask"][0].tolist() == [255, 0, 1, 149, 255, 255, 255, 0]
    half = build_dataset("ade20k", Ade20kConfig(root=str(tmp_path), train_fraction=0.5), "train")
    assert len(half) == 2 and set(half.images) <= set(train.images)


def test_layout_errors_are_one_line(tmp_path):
    with pytest.raises(BenchError, match="data.ade20k.root: not set"):
        build_dataset("ade20k", Ade20kConfig(), "val")
    with pytest.raises(BenchError, match="folder not found"):
        build_dataset("ade20k", Ade20kConfig(root=str(tmp_path / "nope")), "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="images") as err:
        build_dataset("ade20k", Ade20kConfig(root=str(tmp_path / "empty")), "val")
    assert "\n" not in str(err.value)
    base = _tree(str(tmp_path / "t"))
    os.remove(os.path.join(base, "annotations", "validation", "ADE_val_00000002.png"))
    with pytest.raises(BenchError, match="ADE_val_00000002.png"):
        build_dataset("ade20k", Ade20kConfig(root=base), "val")
