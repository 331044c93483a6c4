"""The disk store of rendered synthetic scenes (bench/data/scene_store.py): what a process reads back is exactly
what the renderer draws, a second process renders nothing, and a bad or unwritable store only costs rendering."""

import numpy as np
import pytest

import bench.data.synthetic as synthetic
from bench.data.synthetic import SyntheticConfig, SyntheticScenes


def _same(a: dict, b: dict) -> bool:
    if not (a["image"].equal(b["image"]) and a["mask"].equal(b["mask"]) and len(a["instances"]) == len(b["instances"])):
        return False
    return all(set(p) == set(q) and p["category_id"] == q["category_id"] and np.array_equal(p["mask"], q["mask"])
               and p["bbox"] == q["bbox"] and p["area"] == q["area"] for p, q in zip(a["instances"], b["instances"]))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_CACHE", str(tmp_path / "scenes"))
    return tmp_path / "scenes"


def test_stored_scenes_are_the_rendered_ones_with_their_instances(store):
    cfg = SyntheticConfig(num_train=40, num_val=8)
    rendered = SyntheticScenes(SyntheticConfig(num_train=40, num_val=8, cache=False), "train")
    first = SyntheticScenes(cfg, "train")
    assert _same(first[0], rendered[0])
    assert len(list(store.glob("scenes-train-*.npz"))) == 1
    again = SyntheticScenes(cfg, "train")
    cases = list(range(40))
    assert cases and all(_same(again[i], rendered[i]) for i in cases)
    assert sum(len(rendered[i]["instances"]) for i in cases) > 40  # scenes with several things are covered


def test_a_second_process_reads_instead_of_rendering(store, monkeypatch):
    cfg = SyntheticConfig(num_train=16, num_val=4)
    SyntheticScenes(cfg, "val")[0]

    def no_render(*args, **kwargs):
        raise AssertionError("rendered although the store holds the split")

    monkeypatch.setattr(synthetic, "render_scene", no_render)
    assert SyntheticScenes(cfg, "val")[3]["image"].shape == (3, 96, 96)
    with pytest.raises(AssertionError):  # other settings: another file, rendered
        SyntheticScenes(SyntheticConfig(num_train=16, num_val=4, seed=1), "val")[0]


def test_a_corrupt_store_is_rendered_again_and_replaced(store):
    cfg = SyntheticConfig(num_train=8, num_val=4)
    ref = SyntheticScenes(SyntheticConfig(num_train=8, num_val=4, cache=False), "train")[2]
    SyntheticScenes(cfg, "train")[0]
    (path,) = store.glob("scenes-train-*.npz")
    path.write_bytes(b"not an npz")
    assert _same(SyntheticScenes(cfg, "train")[2], ref)
    assert path.stat().st_size > 1000


def test_off_and_unwritable_stores_still_give_the_scenes(tmp_path, monkeypatch):
    cfg = SyntheticConfig(num_train=8, num_val=4)
    ref = SyntheticScenes(SyntheticConfig(num_train=8, num_val=4, cache=False), "train")[5]
    monkeypatch.setenv("BENCH_DATA_CACHE", "off")
    assert _same(SyntheticScenes(cfg, "train")[5], ref)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("BENCH_DATA_CACHE", str(blocker / "sub"))  # a folder cannot be made under a file
    assert _same(SyntheticScenes(cfg, "train")[5], ref)
