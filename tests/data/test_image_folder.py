"""``image_folder`` and ``coco_images``: unlabelled pretraining images from miniature trees written here."""

import numpy as np
import pytest
from PIL import Image

from bench.data import build_dataset
from bench.data.image_folder import CocoImagesConfig, ImageFolderConfig
from bench.errors import BenchError


def _img(path, w=20, h=12, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(path)


def test_image_folder_reads_nested_images_sorted(tmp_path):
    _img(tmp_path / "b" / "deep" / "x.png", value=3)
    _img(tmp_path / "a" / "y.jpg", value=1)
    _img(tmp_path / "z.PNG", value=5)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = build_dataset("image_folder", ImageFolderConfig(root=str(tmp_path)), "train")
    assert len(ds) == 3
    assert [p.split(str(tmp_path))[1] for p in ds.files] == ["/z.PNG", "/a/y.jpg", "/b/deep/x.png"]
    item = ds[2]
    assert item["image"].shape == (3, 12, 20) and int(item["image"].max()) == 3
    assert item["mask"].shape == (12, 20) and set(item["mask"].unique().tolist()) == {255}
    assert len(build_dataset("image_folder", ImageFolderConfig(root=str(tmp_path), max_images=2), "train")) == 2


def test_image_folder_errors_are_one_line(tmp_path):
    with pytest.raises(BenchError, match=r"data.image_folder.root: not set"):
        build_dataset("image_folder", ImageFolderConfig(), "train")
    with pytest.raises(BenchError, match="folder not found"):
        build_dataset("image_folder", ImageFolderConfig(root=str(tmp_path / "none")), "train")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(BenchError, match="no images found"):
        build_dataset("image_folder", ImageFolderConfig(root=str(tmp_path / "empty")), "train")
    with pytest.raises(BenchError, match="for pretraining only; evaluate on a labelled dataset"):
        build_dataset("image_folder", ImageFolderConfig(root=str(tmp_path)), "val")


def test_coco_images_train2017_plus_unlabeled(tmp_path):
    for i in range(3):
        _img(tmp_path / "images" / "train2017" / f"{i:012d}.jpg")
    for i in range(2):
        _img(tmp_path / "images" / "unlabeled2017" / f"{i + 10:012d}.jpg")
    assert len(build_dataset("coco_images", CocoImagesConfig(root=str(tmp_path)), "train")) == 3
    plus = build_dataset("coco_images", CocoImagesConfig(root=str(tmp_path), unlabeled=True), "train")
    assert len(plus) == 5 and plus.files[-1].endswith("unlabeled2017/000000000011.jpg")


def test_coco_images_missing_folders(tmp_path):
    _img(tmp_path / "train2017" / "a.jpg")
    with pytest.raises(BenchError, match="unlabeled2017"):
        build_dataset("coco_images", CocoImagesConfig(root=str(tmp_path), unlabeled=True), "train")
    (tmp_path / "other" / "train2017").mkdir(parents=True)
    with pytest.raises(BenchError, match="holds no images"):
        build_dataset("coco_images", CocoImagesConfig(root=str(tmp_path / "other")), "train")


def test_image_folder_pretrains_with_a_labelled_eval_dataset():
    """Resolution: separate pretraining and evaluation data; paper recipe (real images) by default."""
    from bench.config import load_config

    cfg = load_config(None, ["data.image_folder.root=/x"], {"run": {"methods": ["dino"], "pretrain_data": "image_folder",
                                                                      "eval_data": "synthetic"}})
    assert cfg.data["image_folder"].root == "/x" and cfg.recipes["dino"].name == "paper"
