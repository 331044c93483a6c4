"""The built-in synthetic scenes: deterministic, consistent labels, and the colour knobs do what they say."""

import numpy as np
import torch
import pytest

from bench.data.synthetic import STUFF, THINGS, SyntheticConfig, SyntheticScenes, render_scene
from bench.errors import BenchError


def test_scenes_are_deterministic_and_splits_disjoint():
    a, b = render_scene(123, 64), render_scene(123, 64)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    train, val = SyntheticScenes(SyntheticConfig(), "train"), SyntheticScenes(SyntheticConfig(), "val")
    assert not np.array_equal(train[0]["image"].numpy(), val[0]["image"].numpy())
    assert train.base != val.base


def test_labels_agree_with_instances():
    for seed in range(20):
        scene = render_scene(seed, 96)
        mask = scene["mask"]
        assert mask.min() >= 0 and mask.max() < len(STUFF) + len(THINGS)
        for inst in scene["instances"]:
            m = inst["mask"]
            # every visible pixel of a thing carries that thing's class, and its box bounds it exactly
            assert (mask[m] == len(STUFF) + inst["category_id"] - 1).all()
            ys, xs = np.nonzero(m)
            x, y, w, h = inst["bbox"]
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert inst["area"] == m.sum()


def test_saturation_zero_gives_grey_images():
    img = render_scene(7, 64, saturation=0.0)["image"].astype(int)
    # things carry faint per-channel noise; stuff is exactly grey
    stuff = render_scene(7, 64, saturation=0.0)["mask"] < len(STUFF)
    assert np.abs(img[stuff][:, 0] - img[stuff][:, 1]).max() <= 1
    assert np.abs(img[stuff][:, 1] - img[stuff][:, 2]).max() <= 1


def test_tones_zero_fixes_the_two_tones_of_every_texture():
    scene = render_scene(11, 96, saturation=0.0, tones=0.0)
    stuff = scene["mask"] < len(STUFF)
    grey = scene["image"][..., 0][stuff].astype(float) / 255
    # textures blend a dark tone 0.2 and a light tone 0.8 (waves blend smoothly between them)
    assert grey.min() >= 0.2 - 1 / 255 and grey.max() <= 0.8 + 1 / 255
    assert np.isclose(grey.min(), 0.2, atol=2 / 255) and np.isclose(grey.max(), 0.8, atol=2 / 255)
    # with random tones the same scene's range differs
    other = render_scene(11, 96, saturation=0.0, tones=1.0)["image"][..., 0][stuff].astype(float) / 255
    assert not np.isclose(other.min(), 0.2, atol=2 / 255) or not np.isclose(other.max(), 0.8, atol=2 / 255)


def test_bad_config_is_one_line():
    with pytest.raises(BenchError, match="size: expected at least 32 pixels"):
        SyntheticConfig(size=8).validate("data.synthetic")


def test_tones_out_of_range_is_one_line():
    with pytest.raises(BenchError, match=r"data.synthetic.tones: expected a number in \[0, 1\], got 1.5"):
        SyntheticConfig(tones=1.5).validate("data.synthetic")


def test_cached_scenes_equal_rendered_ones_and_are_not_shared():
    cached = SyntheticScenes(SyntheticConfig(num_train=4, num_val=1), "train")
    fresh = SyntheticScenes(SyntheticConfig(num_train=4, num_val=1, cache=False), "train")
    first = cached[2]
    first["image"][:] = 0  # a consumer editing its sample in place
    first["mask"][:] = 0
    again, ref = cached[2], fresh[2]
    assert again["mask"].dtype == ref["mask"].dtype == torch.int64
    assert torch.equal(again["image"], ref["image"]) and torch.equal(again["mask"], ref["mask"])
    assert len(again["instances"]) == len(ref["instances"])
    for a, b in zip(again["instances"], ref["instances"]):
        assert np.array_equal(a["mask"], b["mask"]) and a["bbox"] == b["bbox"]
