"""Real-data loaders on miniature trees in each dataset's own on-disk layout, checked pixel for pixel.

Each test writes a few images and label PNGs with the real file naming and id encoding (Cityscapes labelIds,
COCO-Stuff stuffthingmaps 0-indexed with 255 unlabeled, COCO-Stuff pixelmaps 92-183, panoptic semantic PNGs,
VOC palette and grayscale masks) and compares the loader's items with labels computed here by hand.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bench.config import build
from bench.data import build_dataset
from bench.errors import BenchError
from bench.registry import DATASETS



def _cfg(name: str, **kw):
    return build(DATASETS.get(name).config_class, kw, f"data.{name}")


def _save_png(path, arr, mode="L", palette=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(np.asarray(arr, dtype=np.uint8), mode=mode)
    if palette is not None:
        im.putpalette(palette)
    im.save(path)


def _save_rgb(path, rng, h, w):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path, **({"quality": 95} if path.endswith(".jpg") else {}))
    return np.array(Image.open(path).convert("RGB"))  # what a decoder gives back (JPEG is lossy)


# ------------------------------------------------------------------------------------- resources

def test_coco_hierarchy_resource_is_consistent_and_shipped():
    from importlib import resources

    text = resources.files("bench.data").joinpath("resources/coco_stuff_hierarchy.json").read_text()
    h = json.loads(text)
    assert "_provenance" in h and "IIC" in h["_provenance"]
    arr = h["fine_to_coarse27"]
    assert len(arr) == 182 and set(arr) == set(range(27))
    # the compact array and the grouped member lists (two separate tables of the spec) agree everywhere
    seen = set()
    for name, members in h["coarse27_members"].items():
        c = h["coarse27_names"].index(name)
        assert all(arr[i] == c for i in members), name
        seen.update(members)
    assert seen == set(range(182))
    assert h["coarse27_names"][:12] == [n for n in h["coarse27_names"] if n.endswith("-things")]
    assert h["fine_names"][0] == "person" and h["fine_names"][181] == "wood" and h["fine_names"][156] == "sky-other"
    # Leopart's class orders are the sorted supercategory names
    assert h["things12_names"] == sorted(n[:-len("-things")] for n in h["coarse27_names"][:12])
    assert h["stuff15_names"] == sorted(h["stuff15_names"]) and len(h["stuff15_names"]) == 15
    for c27, c15 in h["coarse27_to_stuff15"].items():
        a = h["coarse27_names"][int(c27)].replace("-stuff", "").replace("-", "")
        b = h["stuff15_names"][c15].replace("-stuff", "").replace("-", "")
        assert a == b
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml")) as fh:
        assert "resources/*.json" in fh.read()


# ----------------------------------------------------------------------------------- cityscapes

def _cityscapes_tree(root, rng, sizes=(("train", 3), ("val", 2)), h=40, w=80):
    out = {}
    for split, n in sizes:
        for i in range(n):
            city = ["aachen", "zurich"][i % 2] if split == "train" else "frankfurt"
            stem = f"{city}_{i:06d}_{19 + i:06d}"
            img = _save_rgb(os.path.join(root, "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"), rng, h, w)
            lab = rng.integers(0, 34, size=(h, w))
            _save_png(os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png"), lab)
            # the other gtFine files of the release are present too and must be ignored
            _save_png(os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_instanceIds.png"), lab)
            out[(split, stem)] = (img, lab)
    return out


def test_cityscapes27_pixels(tmp_path):
    rng = np.random.default_rng(0)
    tree = _cityscapes_tree(str(tmp_path), rng)
    ds = build_dataset("cityscapes27", _cfg("cityscapes27", root=str(tmp_path), resize=0, crop=0), "val")
    assert len(ds) == 2 and ds.num_classes == 27
    assert ds.class_names[0] == "road" and ds.class_names[26] == "bicycle" and ds.class_names[16] == "sky"
    for i in range(len(ds)):
        stem = os.path.basename(ds.images[i])[: -len("_leftImg8bit.png")]
        img, lab = tree[("val", stem)]
        item = ds[i]
        assert item["index"] == i and item["image"].dtype == torch.uint8 and item["mask"].dtype == torch.int64
        np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), img)
        expect = np.where((lab >= 7) & (lab <= 33), lab - 7, 255)  # protocols.md §2.3
        np.testing.assert_array_equal(item["mask"].numpy(), expect)
    train = build_dataset("cityscapes27", _cfg("cityscapes27", root=str(tmp_path), resize=0, crop=0), "train")
    assert len(train) == 3 and [os.path.basename(p)[:6] for p in train.images] == ["aachen", "aachen", "zurich"]


def test_cityscapes19_uses_the_official_train_ids(tmp_path):
    rng = np.random.default_rng(1)
    tree = _cityscapes_tree(str(tmp_path), rng, sizes=(("train", 1), ("val", 1)))
    ds = build_dataset("cityscapes27", _cfg("cityscapes27", root=str(tmp_path), classes=19, resize=0, crop=0), "val")
    assert ds.num_classes == 19 and ds.class_names[0] == "road" and ds.class_names[18] == "bicycle"
    lab = next(v[1] for k, v in tree.items() if k[0] == "val")
    evaluated = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]  # §4.1
    table = {lid: t for t, lid in enumerate(evaluated)}
    expect = np.vectorize(lambda v: table.get(int(v), 255))(lab)
    np.testing.assert_array_equal(ds[0]["mask"].numpy(), expect)


def test_protocol_resize_and_centre_crop(tmp_path):
    rng = np.random.default_rng(2)
    tree = _cityscapes_tree(str(tmp_path), rng, sizes=(("train", 1), ("val", 1)), h=40, w=80)
    ds = build_dataset("cityscapes27", _cfg("cityscapes27", root=str(tmp_path), resize=20, crop=20), "val")
    img, lab = next(v for k, v in tree.items() if k[0] == "val")
    item = ds[0]
    assert tuple(item["image"].shape) == (3, 20, 20) and tuple(item["mask"].shape) == (20, 20)
    # shorter side 40 -> 20 (factor 2): nearest picks the centre pixel (2i+1) of every 2x2 block, as PIL;
    # the 20x40 map is then centre-cropped at column round((40 - 20) / 2) = 10
    mapped = np.where((lab >= 7) & (lab <= 33), lab - 7, 255)
    np.testing.assert_array_equal(item["mask"].numpy(), mapped[1::2, 1::2][:, 10:30])
    # the image follows PIL's bilinear resize (PiCIE's TF.resize on PIL images) up to rounding
    ref = np.array(Image.fromarray(img).resize((40, 20), Image.BILINEAR), dtype=np.float64)[:, 10:30]
    assert np.abs(item["image"].permute(1, 2, 0).numpy() - ref).max() <= 1.0
    assert torch.equal(ds.load_mask(0), item["mask"])


def test_cityscapes_errors_name_what_is_missing(tmp_path):
    with pytest.raises(BenchError, match=r"data.cityscapes27.root: not set"):
        build_dataset("cityscapes27", _cfg("cityscapes27"), "val")
    with pytest.raises(BenchError, match=r"folder not found"):
        build_dataset("cityscapes27", _cfg("cityscapes27", root=str(tmp_path / "nope")), "val")
    with pytest.raises(BenchError, match=r"leftImg8bit/val"):
        build_dataset("cityscapes27", _cfg("cityscapes27", root=str(tmp_path)), "val")
    rng = np.random.default_rng(3)
    _cityscapes_tree(str(tmp_path), rng, sizes=(("val", 2),))
    victim = sorted((tmp_path / "gtFine" / "val" / "frankfurt").glob("*_labelIds.png"))[1]
    victim.unlink()
    with pytest.raises(BenchError, match=f"expected file .*{victim.name}"):
        build_dataset("cityscapes27", _cfg("cityscapes27", root=str(tmp_path)), "val")
    with pytest.raises(BenchError, match="classes"):
        _cfg("cityscapes27", root=str(tmp_path), classes=20)


# ---------------------------------------------------------------------------------- COCO-Stuff-27

def _coco27_tree(root, rng, ids_by_split, curated_by_split=None, h=14, w=18):
    out = {}
    for split, ids in ids_by_split.items():
        for j, i in enumerate(ids):
            img = _save_rgb(os.path.join(root, "images", f"{split}2017", f"{i}.jpg"), rng, h, w)
            lab = rng.choice(np.r_[np.arange(182), 255], size=(h, w))
            if j == 0:  # every value at least once
                lab.reshape(-1)[:183] = np.r_[np.arange(182), 255]
            _save_png(os.path.join(root, "annotations", f"{split}2017", f"{i}.png"), lab)
            out[i] = (img, lab)
    for split, ids in (curated_by_split or {}).items():
        path = os.path.join(root, "curated", f"{split}2017", "Coco164kFull_Stuff_Coarse_7.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write("".join(f"{i}\n" for i in ids))
    return out


def _coarse27_by_members() -> dict:
    """fine index -> coarse class from the grouped member lists (not the compact array the loader uses)."""
    from bench.data._real import resource

    h = resource("coco_stuff_hierarchy.json")
    return {f: h["coarse27_names"].index(name) for name, members in h["coarse27_members"].items() for f in members}


def test_coco_stuff27_curated_pixels(tmp_path):
    rng = np.random.default_rng(4)
    ids = [f"{n:012d}" for n in (139, 285, 632, 724, 776)]
    tree = _coco27_tree(str(tmp_path), rng, {"train": ids[:3], "val": ids[3:]},
                        {"train": [ids[2], ids[0]], "val": [ids[3], ids[4]]})
    cfg = _cfg("coco_stuff27", root=str(tmp_path), resize=0, crop=0)
    train = build_dataset("coco_stuff27", cfg, "train")
    assert [os.path.basename(p) for p in train.images] == [f"{ids[2]}.jpg", f"{ids[0]}.jpg"]  # list order
    val = build_dataset("coco_stuff27", cfg, "val")
    assert len(val) == 2 and val.num_classes == 27 and len(val.class_names) == 27
    table = _coarse27_by_members()
    spot = {0: 9, 1: 11, 15: 7, 71: 0, 91: 17, 105: 23, 156: 23, 168: 22, 181: 24, 255: 255}  # §2.2 by hand
    assert all(table.get(k, 255) == v for k, v in spot.items())
    for ds in (train, val):
        for i in range(len(ds)):
            img, lab = tree[os.path.basename(ds.images[i])[:-4]]
            item = ds[i]
            np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), img)
            np.testing.assert_array_equal(item["mask"].numpy(), np.vectorize(lambda v: table.get(int(v), 255))(lab))
    assert any("differs from the published" in n for n in val.notes)  # md5 of our toy list


def test_coco_stuff27_all_fraction_and_errors(tmp_path):
    rng = np.random.default_rng(5)
    ids = [f"{n:012d}" for n in range(1, 11)]
    _coco27_tree(str(tmp_path), rng, {"train": ids, "val": ids[:2]})
    with pytest.raises(BenchError, match="Coco164kFull_Stuff_Coarse_7.txt"):
        build_dataset("coco_stuff27", _cfg("coco_stuff27", root=str(tmp_path)), "val")
    cfg = _cfg("coco_stuff27", root=str(tmp_path), subset="all", train_fraction=0.3, resize=0, crop=0)
    a = build_dataset("coco_stuff27", cfg, "train")
    b = build_dataset("coco_stuff27", cfg, "train")
    assert len(a) == 3 and a.images == b.images and set(a.images) < {
        os.path.join(str(tmp_path), "images", "train2017", f"{i}.jpg") for i in ids}
    assert len(build_dataset("coco_stuff27", cfg, "val")) == 2
    os.remove(os.path.join(str(tmp_path), "annotations", "val2017", f"{ids[1]}.png"))
    with pytest.raises(BenchError, match=f"expected file .*{ids[1]}.png"):
        build_dataset("coco_stuff27", cfg, "val")
    with pytest.raises(BenchError, match="subset"):
        _cfg("coco_stuff27", subset="some")
    with pytest.raises(BenchError, match="crop"):
        _cfg("coco_stuff27", resize=100, crop=200)


# ------------------------------------------------------------------------ Leopart COCO-Stuff / Things

def _leopart_coco_tree(root, rng, kind, values, n_train=10, n_val=2, h=12, w=16):
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(n):
            i = f"{1000 + k:012d}"
            img = _save_rgb(os.path.join(root, "coco", "images", f"{split}2017", f"{i}.jpg"), rng, h, w)
            lab = rng.choice(values, size=(h, w))
            lab.reshape(-1)[:len(values)] = values
            sub = (os.path.join("annotations", "annotations", "stuff_annotations", f"stuff_{split}2017_pixelmaps")
                   if kind == "stuff" else
                   os.path.join("annotations", "panoptic_annotations", f"semantic_segmentation_{split}2017"))
            _save_png(os.path.join(root, sub, f"{i}.png"), lab)
            out[(split, i)] = (img, lab)
    return out


def _check_items(ds, tree, split, table):
    for i in range(len(ds)):
        img, lab = tree[(split, os.path.basename(ds.images[i])[:-4])]
        item = ds[i]
        np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), img)
        np.testing.assert_array_equal(item["mask"].numpy(), np.vectorize(lambda v: table[int(v)])(lab))


def test_coco_stuff15_pixels(tmp_path):
    # COCO-Stuff ids by hand (labels.txt): 92 banner, 95 bridge, 101 carpet, 106 clouds, 149 road, 157 sky-other,
    # 182 wood; 183 other (things) and 0 are ignored
    table = {0: 255, 183: 255, 92: 11, 95: 0, 101: 2, 106: 8, 149: 5, 157: 8, 182: 9}
    rng = np.random.default_rng(6)
    tree = _leopart_coco_tree(str(tmp_path), rng, "stuff", np.array(list(table)))
    cfg = _cfg("coco_stuff15", root=str(tmp_path))
    train, val = build_dataset("coco_stuff15", cfg, "train"), build_dataset("coco_stuff15", cfg, "val")
    assert len(train) == 1 and len(val) == 2  # Leopart: 10 % of train, all of val
    assert val.class_names[11] == "textile" and val.class_names[0] == "building" and val.num_classes == 15
    _check_items(train, tree, "train", table)
    _check_items(val, tree, "val", table)


def test_coco_things_pixels(tmp_path):
    # COCO ids by hand: 1 person, 3 car, 10 traffic light, 18 dog, 27 backpack, 37 sports ball, 44 bottle,
    # 52 banana, 62 chair, 72 tv, 78 microwave, 84 book; panoptic stuff ids (184, 200) and 0 are ignored
    table = {1: 9, 3: 11, 10: 8, 18: 1, 27: 0, 37: 10, 44: 7, 52: 4, 62: 5, 72: 3, 78: 2, 84: 6,
             0: 255, 184: 255, 200: 255}
    rng = np.random.default_rng(7)
    tree = _leopart_coco_tree(str(tmp_path), rng, "thing", np.array(list(table)), h=10, w=12)
    cfg = _cfg("coco_things", root=str(tmp_path), train_fraction=1.0)
    train, val = build_dataset("coco_things", cfg, "train"), build_dataset("coco_things", cfg, "val")
    assert len(train) == 10 and val.num_classes == 12 and val.class_names[9] == "person"
    _check_items(train, tree, "train", table)
    _check_items(val, tree, "val", table)
    with pytest.raises(BenchError, match="semantic_segmentation_val2017"):
        build_dataset("coco_things", _cfg("coco_things", root=str(tmp_path / "coco")), "val")


# --------------------------------------------------------------------------------------------- VOC

def _voc_palette():
    from bench.data.voc import voc_colormap

    return voc_colormap().reshape(-1).tolist()


def _voc_tree(base, rng, leopart=False):
    """Mixed image sizes; val masks are palette PNGs, trainaug masks grayscale."""
    img_dir = os.path.join(base, "images" if leopart else "JPEGImages")
    sets = os.path.join(base, "sets" if leopart else os.path.join("ImageSets", "Segmentation"))
    os.makedirs(sets, exist_ok=True)
    sizes = [(24, 32), (32, 24), (24, 32), (16, 40), (24, 24), (32, 32)]
    ids = [f"2007_{n:06d}" for n in range(6)]
    out = {}
    values = np.r_[np.arange(21), 255]
    for i, (h, w) in zip(ids, sizes):
        img = _save_rgb(os.path.join(img_dir, f"{i}.jpg"), rng, h, w)
        lab = rng.choice(values, size=(h, w))
        _save_png(os.path.join(base, "SegmentationClass", f"{i}.png"), lab, mode="P", palette=_voc_palette())
        aug = rng.choice(values[:-1], size=(h, w))
        _save_png(os.path.join(base, "SegmentationClassAug", f"{i}.png"), aug, mode="L")
        out[i] = (img, lab, aug)
    with open(os.path.join(sets, "val.txt"), "w") as fh:
        fh.write(f"{ids[4]}\n{ids[5]}\n")
    with open(os.path.join(sets, "train.txt"), "w") as fh:
        fh.write(f"{ids[0]}\n")
    return ids, out


def test_voc12_devkit_layout_pixels(tmp_path):
    rng = np.random.default_rng(8)
    base = os.path.join(str(tmp_path), "VOCdevkit", "VOC2012")
    ids, tree = _voc_tree(base, rng)
    cfg = _cfg("voc12", root=str(tmp_path))  # a parent of VOCdevkit/VOC2012 is found
    val = build_dataset("voc12", cfg, "val")
    train = build_dataset("voc12", cfg, "train")  # trainaug = SegmentationClassAug minus val (no list file)
    assert [os.path.basename(p)[:-4] for p in val.images] == ids[4:]
    assert [os.path.basename(p)[:-4] for p in train.images] == ids[:4]
    assert val.num_classes == 21 and val.class_names[15] == "person"
    for i in range(len(val)):
        img, lab, _ = tree[ids[4 + i]]
        np.testing.assert_array_equal(val[i]["image"].permute(1, 2, 0).numpy(), img)
        np.testing.assert_array_equal(val[i]["mask"].numpy(), lab)  # palette indices, not colours
    for i in range(len(train)):
        _, _, aug = tree[ids[i]]
        np.testing.assert_array_equal(train[i]["mask"].numpy(), aug)
    assert {tuple(train[i]["image"].shape) for i in range(len(train))} == {(3, 24, 32), (3, 32, 24), (3, 16, 40)}
    only_train = build_dataset("voc12", _cfg("voc12", root=base, train_split="train"), "train")
    np.testing.assert_array_equal(only_train[0]["mask"].numpy(), tree[ids[0]][1])


def test_voc12_rgb_masks_and_leopart_layout(tmp_path):
    rng = np.random.default_rng(9)
    base = os.path.join(str(tmp_path), "VOCSegmentation")
    ids, tree = _voc_tree(base, rng, leopart=True)
    with open(os.path.join(base, "sets", "trainaug.txt"), "w") as fh:
        fh.write(f"{ids[1]}\n{ids[3]}\n")
    # an RGB-converted palette mask decodes back to the indices (boundary colour -> 255)
    lab = tree[ids[5]][1]
    Image.open(os.path.join(base, "SegmentationClass", f"{ids[5]}.png")).convert("RGB").save(
        os.path.join(base, "SegmentationClass", f"{ids[5]}.png"))
    cfg = _cfg("voc12", root=str(tmp_path))
    val = build_dataset("voc12", cfg, "val")
    np.testing.assert_array_equal(val[1]["mask"].numpy(), lab)
    train = build_dataset("voc12", cfg, "train")
    assert [os.path.basename(p)[:-4] for p in train.images] == [ids[1], ids[3]]
    with pytest.raises(BenchError, match="JPEGImages"):
        build_dataset("voc12", _cfg("voc12", root=str(tmp_path / "VOCSegmentation" / "sets")), "val")


# ---------------------------------------------------------------------------- tasks on mixed sizes

def test_linseg_and_cluster_run_on_mixed_size_images(tmp_path):
    from bench.backbones import create_backbone
    from tasks.base import EvalData
    from tasks.cluster import ClusterConfig, Clustering
    from tasks.linseg import LinearSegmentation, LinsegConfig

    rng = np.random.default_rng(10)
    _voc_tree(os.path.join(str(tmp_path), "VOC2012"), rng)
    cfg = _cfg("voc12", root=str(tmp_path))
    data = EvalData("voc12", build_dataset("voc12", cfg, "train"), build_dataset("voc12", cfg, "val"), 21,
                    list(DATASETS.get("voc12").class_names))
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_d4_p8", "", 0.0).eval()
    dev = torch.device("cpu")
    for preset in ("synthetic", "leopart"):
        lcfg = build(LinsegConfig, {"preset": preset, "epochs": 1, "input_size": 0 if preset == "synthetic" else 32,
                                    "eval_mask_size": 0 if preset == "synthetic" else 32, "train_mask_size": 16,
                                    "batch_size": 4}, "tasks.linseg")
        res = LinearSegmentation(lcfg).evaluate(model.forward_dense, data, dev)
        assert 0.0 <= res.metrics["pixel_acc"] <= 100.0
    aug = build(LinsegConfig, {"epochs": 1, "augment": True, "batch_size": 4}, "tasks.linseg")  # native + augment
    assert np.isfinite(LinearSegmentation(aug).evaluate(model.forward_dense, data, dev).metrics["pixel_acc"])
    ccfg = build(ClusterConfig, {"k": 21, "seeds": 2, "iters": 5}, "tasks.cluster")
    res = Clustering(ccfg).evaluate(model.forward_dense, data, dev)
    n_valid = sum(int((data.val[i]["mask"] != 255).sum()) for i in range(len(data.val)))
    assert 0.0 <= res.metrics["pixel_acc"] <= 100.0 and len(res.per_class["miou_per_seed"]) == 2
    assert n_valid > 0


# ---------------------------------------------------------------------------------- bench data check

def test_data_check_cli_counts_histogram_and_errors(tmp_path, capsys):
    from bench.cli import main

    rng = np.random.default_rng(11)
    tree = _cityscapes_tree(str(tmp_path), rng, sizes=(("train", 3), ("val", 2)), h=20, w=40)
    rc = main(["data", "check", "--data", "cityscapes27", "--set", f"data.cityscapes27.root={tmp_path}",
               "--set", "data.cityscapes27.resize=0", "--set", "data.cityscapes27.crop=0", "--max-images", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "train         3 images  (standard 2,975: different)" in out and "val           2 images" in out
    labs = np.concatenate([v[1].reshape(-1) for k, v in tree.items() if k[0] == "val"])
    road = int((labs == 7).sum())
    line = next(ln for ln in out.splitlines() if " road " in ln)
    assert line.split()[-1].replace(",", "") == str(road)
    assert f"{100.0 * road / labs.size:.2f}%" in line
    ign = next(ln for ln in out.splitlines() if "ignore (255)" in ln and "%" in ln)
    assert ign.split()[-1].replace(",", "") == str(int((labs < 7).sum()))

    rc = main(["data", "check", "--data", "cityscapes27", "--set", f"data.cityscapes27.root={tmp_path}/missing"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "folder not found" in err
    rc = main(["data", "check", "--data", "nosuch"])
    assert rc == 2 and "unknown dataset 'nosuch'" in capsys.readouterr().err
