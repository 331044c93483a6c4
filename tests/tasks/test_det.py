"""The det task: config presets, the torchvision detector's pyramids and training pieces, a tiny end-to-end
evaluation through bench.evaluate, and the instance datasets in their real layouts."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch

from bench.backbones import create_backbone
from bench.config import build
from bench.errors import BenchError
from tasks.det import PRESETS, DetConfig
from tasks.detection import torchvision_backend as tvb
from tasks.detection.coco import STAT_NAMES


def _cfg(**kw) -> DetConfig:
    return build(DetConfig, kw, "tasks.det")


def test_presets_fill_unset_fields_and_user_values_win():
    cfg = _cfg(preset="1x", lr=0.01)
    assert cfg.lr == 0.01 and cfg.iters == 90000 and cfg.steps == [60000, 80000] and cfg.batch_size == 16
    assert cfg.train_sizes == [640, 672, 704, 736, 768, 800] and cfg.test_size == 800 and cfg.max_size == 1333
    assert (cfg.box_convs, cfg.box_fc, cfg.mask_convs, cfg.norm, cfg.fpn_channels) == (4, 1024, 4, "bn", 256)
    city = _cfg(preset="cityscapes")
    assert (city.iters, city.batch_size, city.lr, city.steps, city.test_size, city.max_size) == \
        (24000, 8, 0.01, [18000], 1024, 2048)
    # shortening the schedule keeps the drops at the same fractions (60k/90k, 80k/90k)
    assert _cfg(preset="1x", iters=900).steps == [600, 800] and _cfg(preset="1x", iters=900).warmup_iters == 10
    assert _cfg(preset="1x", iters=900, steps=[100]).steps == [100]
    assert PRESETS["1x"] is not None and _cfg().preset == "synthetic"


@pytest.mark.parametrize("kw, message", [
    ({"preset": "3x"}, r"tasks\.det\.preset: unknown preset '3x'"),
    ({"backend": "mmdet"}, r"tasks\.det\.backend: unknown backend 'mmdet'"),
    ({"optimizer": "lamb"}, r"tasks\.det\.optimizer: expected sgd or adamw"),
    ({"anchor_sizes": [32, 64]}, r"tasks\.det\.anchor_sizes: expected 5 sizes"),
    ({"iters": 0}, r"iters, batch_size and lr must be positive"),
])
def test_bad_config(kw, message):
    with pytest.raises(BenchError, match=message):
        _cfg(**kw)


def test_lr_factor_warmup_and_steps():
    cfg = _cfg(preset="1x")
    assert tvb.lr_factor(0, cfg) == pytest.approx(0.001)
    assert tvb.lr_factor(500, cfg) == pytest.approx(0.001 * 0.5 + 0.5)
    assert tvb.lr_factor(1000, cfg) == 1.0 and tvb.lr_factor(59999, cfg) == 1.0
    assert tvb.lr_factor(60000, cfg) == pytest.approx(0.1) and tvb.lr_factor(89999, cfg) == pytest.approx(0.01)


@pytest.mark.parametrize("name, patch", [("vit_tiny_d4_p8", 8), ("vit_tiny_p16", 16)])
def test_vit_simple_pyramid_strides(name, patch):
    body = create_backbone(name)
    neck = tvb.SimpleFeaturePyramid(body, 32)
    out = neck(torch.randn(2, 3, 128, 192))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    for key, stride in zip(out, (4, 8, 16, 32, 64)):
        assert out[key].shape == (2, 32, 128 // stride, 192 // stride), (key, stride)
    # the ViTDet branches: x4 = two deconvs, x1 = no resampling, x1/2 = a 2x2 max-pool (patch 16)
    kinds = [[type(m).__name__ for m in b] for b in neck.branches]
    ups = [k.count("ConvTranspose2d") for k in kinds]
    assert ups == ([1, 0, 0, 0] if patch == 8 else [2, 1, 0, 0])
    assert kinds[3][0] == "MaxPool2d"


def test_resnet_fpn_levels():
    neck = tvb.ResNetFPN(create_backbone("resnet18"), 16, "bn")
    out = neck(torch.randn(2, 3, 64, 64))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def test_flip_keeps_boxes_tight_around_masks():
    from bench.data.synthetic import SyntheticConfig, SyntheticScenes

    item = SyntheticScenes(SyntheticConfig(num_val=4), "val")[2]
    img, t = tvb.item_to_target(item, flip=True, with_masks=True)
    assert torch.equal(img, item["image"].float().flip(-1) / 255)
    for box, mask in zip(t["boxes"], t["masks"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert t["labels"].tolist() == [i["category_id"] for i in item["instances"]]


def test_crowd_and_tiny_instances_are_not_trained_on():
    m = np.zeros((8, 8), bool)
    m[1:5, 1:5] = True
    item = {"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "instances": [
        {"bbox": [1, 1, 4, 4], "category_id": 2, "mask": m, "iscrowd": 1},
        {"bbox": [1, 1, 0.5, 4], "category_id": 1, "mask": m},
        {"bbox": [1, 1, 4, 4], "category_id": 3, "mask": m}]}
    _, t = tvb.item_to_target(item, flip=False, with_masks=True)
    assert t["labels"].tolist() == [3] and t["masks"].shape == (1, 8, 8)


def test_layer_decay_groups():
    body = create_backbone("vit_tiny_d4_p8")
    model = tvb.build_detector(body, 4, _cfg())
    groups = tvb.param_groups(model, body, 0.05, 0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    m = body.model
    assert scale_of[id(m.pos_embed)] == 0.5 ** 5 and wd_of[id(m.pos_embed)] == 0.0
    assert scale_of[id(m.blocks[0].attn.qkv.weight)] == 0.5 ** 4 and wd_of[id(m.blocks[0].attn.qkv.weight)] == 0.05
    assert scale_of[id(m.blocks[3].mlp.fc2.weight)] == 0.5
    assert scale_of[id(m.norm.weight)] == 1.0
    head_w = model.roi_heads.box_predictor.cls_score.weight
    assert scale_of[id(head_w)] == 1.0 and wd_of[id(head_w)] == 0.05
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_tiny_det_through_evaluate_method(tmp_path):
    """bench.evaluate hands det the trainable backbone; det fine-tunes a copy and writes the named stats."""
    from bench.evaluate import evaluate_method

    spec = {"backbone": {"name": "vit_tiny_d4_p8", "init": "", "drop_path": 0.0}, "seed": 0,
            "eval_dataset": "synthetic", "eval_dataset_cfg": {"num_train": 8, "num_val": 3},
            "tasks": {"det": {"iters": 2, "batch_size": 2, "eval_batch_size": 3}}, "n_pretrain_images": 8}
    torch.manual_seed(0)
    before = create_backbone("vit_tiny_d4_p8").state_dict()
    res = evaluate_method("random-init", None, ["det"], spec, str(tmp_path))["det"]
    names = [f"{t}_{n}" for t in ("bbox", "segm") for n in STAT_NAMES]
    assert list(res["metrics"]) == names and res["primary"] == "bbox_AP"
    for v in res["metrics"].values():
        assert math.isnan(v) or 0.0 <= v <= 100.0
    assert "torchvision Mask R-CNN" in res["protocol"] and "2 it x 2 img" in res["protocol"]
    text = open(res["figures"]["cocoeval.txt"]).read()
    printed = [float(v) for v in re.findall(r"\] = (-?\d+\.\d+)", text)]
    ours = [res["metrics"][n] for n in names]
    assert all((p == -1 and math.isnan(m)) or p == pytest.approx(round(m / 100, 3)) for p, m in zip(printed, ours))
    assert json.load(open(tmp_path / "eval_det.json"))["metrics"]["bbox_AP"] == res["metrics"]["bbox_AP"] or \
        math.isnan(res["metrics"]["bbox_AP"])
    # the untrained backbone the baseline row starts from was copied, not trained in place
    torch.manual_seed(0)
    again = create_backbone("vit_tiny_d4_p8").state_dict()
    assert all(torch.equal(before[k], again[k]) for k in before)


def test_det_needs_instances():
    from bench.data.synthetic import SyntheticConfig, SyntheticScenes
    from tasks.base import EvalData
    from tasks.det import Detection

    class NoInst(SyntheticScenes):
        has_instances = False

    c = SyntheticConfig(num_train=2, num_val=2)
    data = EvalData("plain", NoInst(c, "train"), NoInst(c, "val"), 10, [])
    body = create_backbone("vit_tiny_d4_p8")
    with pytest.raises(BenchError, match="dataset 'plain' has no instance annotations"):
        Detection(_cfg()).evaluate(body.forward_dense, data, torch.device("cpu"), backbone=body)


@pytest.mark.slow
def test_det_fits_its_training_images():
    """Fine-tuning really trains the detector: scored on its own 8 training scenes, box and mask AP are high."""
    from bench.data.synthetic import SyntheticConfig, SyntheticScenes
    from tasks.base import EvalData
    from tasks.det import Detection

    torch.set_num_threads(2)
    c = SyntheticConfig(num_train=8)
    scenes = SyntheticScenes(c, "train")
    data = EvalData("synthetic", scenes, scenes, 10, [])
    torch.manual_seed(0)
    body = create_backbone("vit_tiny_d4_p8")
    cfg = _cfg(iters=80, batch_size=4, steps=[70], warmup_iters=5, flip=False)
    res = Detection(cfg).evaluate(body.forward_dense, data, torch.device("cpu"), backbone=body)
    assert res.metrics["bbox_AP"] > 30.0 and res.metrics["segm_AP"] > 30.0, res.metrics


# ----------------------------------------------------------------------------- instance datasets

def _write_coco(root):
    from PIL import Image

    from tasks.detection.coco import encode_mask

    os.makedirs(root / "annotations")
    for split, n in (("train", 2), ("val", 1)):
        os.makedirs(root / f"{split}2017")
        images, anns = [], []
        for i in range(n):
            img_id = 100 + i
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(root / f"{split}2017" / f"{img_id}.jpg")
            images.append({"id": img_id, "file_name": f"{img_id}.jpg", "height": 20, "width": 30})
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": 18, "iscrowd": 0, "area": 12.0,
                         "bbox": [2.0, 3.0, 4.0, 3.0], "segmentation": [[2, 3, 6, 3, 6, 6, 2, 6]]})
            crowd = np.zeros((20, 30), bool)
            crowd[10:15, 10:20] = True
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": 90, "iscrowd": 1, "area": 50.0,
                         "bbox": [10.0, 10.0, 10.0, 5.0], "segmentation": encode_mask(crowd)})
        cats = [{"id": 18, "name": "dog", "supercategory": "animal"},
                {"id": 90, "name": "toothbrush", "supercategory": "indoor"}]
        with open(root / "annotations" / f"instances_{split}2017.json", "w") as fh:
            json.dump({"images": images, "annotations": anns, "categories": cats}, fh)


def test_coco_instances_layout(tmp_path):
    from bench.data.coco_instances import CocoInstances, CocoInstancesConfig

    _write_coco(tmp_path)
    ds = CocoInstances(build(CocoInstancesConfig, {"root": str(tmp_path)}, "data.coco_instances"), "train")
    assert len(ds) == 2 and ds.thing_classes == ["dog", "toothbrush"] and ds.category_ids == [18, 90]
    item = ds[1]
    assert item["image"].shape == (3, 20, 30) and item["image_id"] == 101 and ds.image_id(1) == 101
    dog, crowd = item["instances"]
    assert dog["category_id"] == 1 and crowd["category_id"] == 2 and crowd["iscrowd"] == 1
    assert dog["mask"].shape == (20, 30) and dog["mask"][4, 4] and not dog["mask"][10, 12]
    assert crowd["mask"].sum() == 50
    assert item["mask"][4, 4] == 0 and item["mask"][12, 12] == 255 and item["mask"][0, 0] == 2  # 2 = background
    assert ds.coco_api().getCatIds() == [18, 90]


def test_coco_instances_bad_root(tmp_path):
    from bench.data.coco_instances import CocoInstances, CocoInstancesConfig

    with pytest.raises(BenchError, match=r"data\.coco_instances\.root: not set"):
        CocoInstances(CocoInstancesConfig(), "val")
    with pytest.raises(BenchError, match=r"annotations/instances_val2017\.json not found"):
        CocoInstances(CocoInstancesConfig(root=str(tmp_path)), "val")


def test_cityscapes_instances_layout(tmp_path):
    from PIL import Image

    from bench.data.coco_instances import CityscapesInstances, CityscapesInstancesConfig

    city = "aachen"
    stem = f"{city}_000000_000019"
    os.makedirs(tmp_path / "leftImg8bit" / "val" / city)
    os.makedirs(tmp_path / "gtFine" / "val" / city)
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(tmp_path / "leftImg8bit" / "val" / city /
                                                           f"{stem}_leftImg8bit.png")
    inst = np.full((8, 16), 7, np.int32)  # road
    inst[1:3, 1:4] = 26001  # car #1
    inst[4:6, 5:9] = 24000  # person #0
    inst[6:8, 10:16] = 26  # a car group: crowd
    inst[0, 15] = 29005  # caravan: not evaluated
    Image.fromarray(inst.astype(np.uint16)).save(tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_instanceIds.png")
    ds = CityscapesInstances(CityscapesInstancesConfig(root=str(tmp_path)), "val")
    assert ds.thing_classes == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    item = ds[0]
    insts = {(i["category_id"], i["iscrowd"]): i for i in item["instances"]}
    assert set(insts) == {(1, 0), (3, 0), (3, 1)}
    assert insts[(3, 0)]["bbox"] == [1.0, 1.0, 3.0, 2.0] and insts[(1, 0)]["area"] == 8.0
    assert item["mask"][0, 0] == 0 and item["mask"][1, 1] == 13 and item["mask"][4, 5] == 11  # trainIds
    assert item["mask"][0, 15] == 255
    assert ds.d2_dataset("val") is None  # the folder is not named cityscapes


@pytest.mark.slow
def test_bench_run_det_end_to_end(tmp_path, monkeypatch, capsys):
    """`bench run --tasks det` on a tiny config: box and mask AP columns in the leaderboard and in MLflow."""
    import ray

    from bench.cli import main
    from tests.support import tiny_argv

    monkeypatch.chdir(tmp_path)
    argv = ["run", "--methods", "dino", "--tasks", "det", "--run-id", "det", "--no-progress"] + tiny_argv(
        "--set", "tasks.det.iters=2", "--set", "tasks.det.batch_size=2")
    try:
        assert main(argv) == 0
    finally:
        ray.shutdown()
    header = (tmp_path / "results" / "det.md").read_text().splitlines()[0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[1:4] == ["det/bbox_AP", "det/bbox_AP50", "det/bbox_AP75"] and "det/segm_AP" in cols
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("bench")
    evals = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("bench.kind") == "eval"]
    assert {r.data.tags["method"] for r in evals} == {"dino", "random-init"}
    for r in evals:
        assert r.data.tags["bench.primary"] == "bbox_AP" and "det/segm_AP" in r.data.metrics
        assert "figures/det_cocoeval.txt" in [a.path for a in client.list_artifacts(r.info.run_id, "figures")]
