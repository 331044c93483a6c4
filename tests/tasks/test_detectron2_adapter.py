"""detectron2 adapter without detectron2: weight conversion (protocols.md §3.1), configs (§3.2, §3.3),
launch scripts, the `bench export` command and the det task's detectron2 backend up to the subprocess."""

import ast
import json
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch
import yaml

from bench.backbones import create_backbone
from bench.errors import BenchError
from tasks.detection import d2_config, d2_convert

NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def detectron2_r50_keys() -> dict:
    """What detectron2's ResNet-50 (BasicStem + 3-4-6-3 BottleneckBlocks, res2 out 256) holds, by hand."""
    keys = {"stem.conv1.weight": (64, 3, 7, 7)}
    keys.update({f"stem.conv1.norm.{n}": (() if n == "num_batches_tracked" else (64,)) for n in NORM})
    in_ch = 64
    for stage, (blocks, bott, out) in zip((2, 3, 4, 5), ((3, 64, 256), (4, 128, 512), (6, 256, 1024),
                                                         (3, 512, 2048))):
        for b in range(blocks):
            p = f"res{stage}.{b}"
            cin = in_ch if b == 0 else out
            convs = {"conv1": (bott, cin, 1, 1), "conv2": (bott, bott, 3, 3), "conv3": (out, bott, 1, 1)}
            if b == 0:
                convs["shortcut"] = (out, cin, 1, 1)
            for name, shape in convs.items():
                keys[f"{p}.{name}.weight"] = shape
                for n in NORM:
                    keys[f"{p}.{name}.norm.{n}"] = () if n == "num_batches_tracked" else (shape[0],)
        in_ch = out
    return keys


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    net = create_backbone("resnet50")
    with torch.no_grad():  # non-trivial BN statistics, so a round trip is a real check
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return net


def test_protocol_key_table():
    table = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_mean": "stem.conv1.norm.running_mean",
        "layer1.0.bn1.weight": "res2.0.conv1.norm.weight",
        "layer1.0.downsample.0.weight": "res2.0.shortcut.weight",
        "layer1.0.downsample.1.running_var": "res2.0.shortcut.norm.running_var",
        "layer4.2.bn3.num_batches_tracked": "res5.2.conv3.norm.num_batches_tracked",
        "fc.weight": "stem.fc.weight",
    }
    for src, dst in table.items():
        assert d2_convert.resnet_key_to_d2(src) == dst
        assert d2_convert.d2_key_to_resnet(dst) == src


def test_r50_pickle_matches_detectron2_resnet(r50, tmp_path):
    model, facts = d2_convert.backbone_to_d2(r50)
    assert facts == {"kind": "resnet", "depth": 50, "res2_out_channels": 256}
    path = tmp_path / "model.pkl"
    d2_convert.write_pickle(model, str(path))
    with open(path, "rb") as fh:
        blob = pickle.load(fh)
    assert set(blob) == {"model", "__author__", "matching_heuristics"}
    assert blob["matching_heuristics"] is True and blob["__author__"] != "Caffe2"
    expected = detectron2_r50_keys()
    assert len(expected) == 318  # torchvision's 320 minus fc.weight / fc.bias (timm builds no fc here)
    got = {k: tuple(v.shape) for k, v in blob["model"].items()}
    assert got == expected
    assert all(isinstance(v, np.ndarray) for v in blob["model"].values())


def test_round_trip_gives_identical_weights(r50, tmp_path):
    model, _ = d2_convert.backbone_to_d2(r50)
    path = tmp_path / "model.pkl"
    d2_convert.write_pickle(model, str(path))
    state = d2_convert.d2_to_resnet(d2_convert.read_pickle(str(path))["model"])
    fresh = create_backbone("resnet50")
    missing, unexpected = fresh.model.load_state_dict(state, strict=True), None
    original = r50.model.state_dict()
    for k, v in fresh.model.state_dict().items():
        assert v.dtype == original[k].dtype and torch.equal(v, original[k]), k
    x = torch.randn(1, 3, 64, 64)
    r50.eval(), fresh.eval()
    assert torch.equal(r50.forward_dense(x), fresh.forward_dense(x))


def test_resnet18_depth_and_c4_refused():
    net = create_backbone("resnet18")
    model, facts = d2_convert.backbone_to_d2(net)
    assert facts["depth"] == 18 and facts["res2_out_channels"] == 64
    assert "res2.1.conv2.norm.weight" in model and not any(".conv3." in k for k in model)
    with pytest.raises(BenchError, match="C4 res5 head needs a Bottleneck ResNet"):
        d2_config.detectron2_config("coco_R_50_C4_1x", "m.pkl", depth=18, res2_out_channels=64)


def test_vit_keys_are_vitdet_suffixes():
    net = create_backbone("vit_small_p16")
    model, facts = d2_convert.backbone_to_d2(net)
    assert facts == {"kind": "vit", "embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16,
                     "pretrain_img_size": 224}
    assert "cls_token" not in model and "norm.weight" not in model
    assert model["pos_embed"].shape == (1, 14 * 14 + 1, 384)
    assert {k.split(".")[0] for k in model} == {"pos_embed", "patch_embed", "blocks"}
    assert model["blocks.11.attn.qkv.weight"].shape == (3 * 384, 384)


@pytest.mark.parametrize("family", list(d2_config.FAMILIES))
def test_configs_parse_with_protocol_overrides(family, tmp_path):
    path = tmp_path / f"{family}.yaml"
    d2_config.dump_yaml(d2_config.detectron2_config(family, "/w/model.pkl"), str(path), header="# x")
    cfg = yaml.safe_load(path.read_text())
    m = cfg["MODEL"]
    assert m["WEIGHTS"] == "/w/model.pkl"
    assert m["PIXEL_MEAN"] == [123.675, 116.28, 103.53] and m["PIXEL_STD"] == [58.395, 57.12, 57.375]
    assert cfg["INPUT"]["FORMAT"] == "RGB"
    assert m["RESNETS"]["STRIDE_IN_1X1"] is False and m["RESNETS"]["NORM"] == "SyncBN"
    assert m["RESNETS"]["DEPTH"] == 50 and m["BACKBONE"]["FREEZE_AT"] == 0
    assert cfg["TEST"]["PRECISE_BN"]["ENABLED"] is True
    assert cfg["VERSION"] == 2 and "_BASE_" not in cfg
    solver = cfg["SOLVER"]
    if family.startswith("coco"):
        assert (solver["IMS_PER_BATCH"], solver["BASE_LR"], solver["MAX_ITER"], solver["STEPS"]) == \
            (16, 0.02, 90000, [60000, 80000])
        assert cfg["INPUT"]["MIN_SIZE_TRAIN"] == [640, 672, 704, 736, 768, 800]
        assert m["MASK_ON"] is True and m["ROI_HEADS"]["NUM_CLASSES"] == 80
        assert cfg["DATASETS"] == {"TRAIN": ["coco_2017_train"], "TEST": ["coco_2017_val"]}
    if family == "coco_R_50_C4_1x":
        assert m["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm"
        assert (m["RPN"]["PRE_NMS_TOPK_TEST"], m["RPN"]["POST_NMS_TOPK_TEST"]) == (6000, 1000)
    if family == "coco_R_50_FPN_1x":
        box = m["ROI_BOX_HEAD"]
        assert (box["NAME"], box["NUM_CONV"], box["NUM_FC"], box["NORM"]) == ("FastRCNNConvFCHead", 4, 1, "SyncBN")
        assert m["FPN"]["NORM"] == "SyncBN" and m["ROI_MASK_HEAD"]["NORM"] == "SyncBN"
        assert m["ANCHOR_GENERATOR"]["SIZES"] == [[32], [64], [128], [256], [512]]
        assert m["RPN"]["IN_FEATURES"] == ["p2", "p3", "p4", "p5", "p6"]
    if family == "cityscapes_R_50_FPN":
        assert m["ROI_HEADS"]["NUM_CLASSES"] == 8
        assert cfg["INPUT"]["MIN_SIZE_TRAIN"] == list(range(800, 1025, 32))
        assert (cfg["INPUT"]["MIN_SIZE_TEST"], cfg["INPUT"]["MAX_SIZE_TRAIN"]) == (1024, 2048)
        assert (solver["IMS_PER_BATCH"], solver["BASE_LR"], solver["MAX_ITER"], solver["STEPS"]) == \
            (8, 0.01, 24000, [18000])
    if family == "voc_R_50_C4_24k":
        assert m["MASK_ON"] is False and m["ROI_HEADS"]["NUM_CLASSES"] == 20
        assert (solver["MAX_ITER"], solver["STEPS"], solver["WARMUP_ITERS"]) == (24000, [18000, 22000], 100)


def test_unknown_family():
    with pytest.raises(BenchError, match="unknown; valid: coco_R_50_C4_1x"):
        d2_config.detectron2_config("coco_R_101", "m.pkl")


def test_launch_script_is_valid_bash(tmp_path):
    path = tmp_path / "run.sh"
    path.write_text(d2_config.launch_script(str(tmp_path / "model.coco_R_50_FPN_1x.yaml"), gpus=4))
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    text = path.read_text()
    assert "-m tasks.detection.d2_train" in text and "model.coco_R_50_FPN_1x.yaml" in text
    assert 'NUM_GPUS:-4' in text


def test_vitdet_config_is_python_and_refuses_patch8():
    facts = {"kind": "vit", "embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 16, "pretrain_img_size": 224}
    text = d2_config.vitdet_config_py("/w/vit.pkl", facts)
    tree = ast.parse(text)
    assigned = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    assert {"model", "dataloader", "train", "optimizer", "lr_multiplier"} <= assigned
    assert "net.window_block_indexes = [0, 1, 3, 4, 6, 7, 9, 10]" in text
    assert d2_config.global_blocks(12) == [2, 5, 8, 11]
    with pytest.raises(BenchError, match="patch-16"):
        d2_config.vitdet_config_py("/w/vit.pkl", dict(facts, patch_size=8))


def _fake_run(root, backbone="resnet50"):
    """A finished DINO pretraining with a ResNet backbone, as bench run leaves it under <root>/bench_runs/r1."""
    from bench.checkpoint import save_torch
    from bench.config import BackboneConfig
    from methods.build import build_method
    from methods.base import Schedule

    torch.manual_seed(1)
    method = build_method("dino", {}, BackboneConfig(name=backbone), Schedule(10, 10, 1))
    with torch.no_grad():
        for p in method.eval_backbone().parameters():
            p.add_(0.01)  # the teacher differs from a fresh init
    os.makedirs(root / "bench_runs" / "r1" / "dino")
    save_torch({"method": "dino", "step": 10, "method_state": method.state_dict()},
               str(root / "bench_runs" / "r1" / "dino" / "final.pt"))
    return method.eval_backbone()


@pytest.fixture(scope="module")
def r50_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return root, _fake_run(root)


def test_export_cli_writes_pickle_configs_and_scripts(r50_run, tmp_path, monkeypatch, capsys):
    from bench.cli import main

    root, teacher = r50_run
    monkeypatch.chdir(root)
    out_pkl = str(tmp_path / "model.pkl")
    code = main(["export", "--format", "detectron2", "--run", "r1", "--method", "dino", "-o", out_pkl])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    blob = d2_convert.read_pickle(out_pkl)
    state = d2_convert.d2_to_resnet(blob["model"])
    for k, v in teacher.model.state_dict().items():  # the evaluation (teacher) backbone, inferred as resnet50
        assert torch.equal(state[k], v), k
    for family in d2_config.FAMILIES:
        cfg = yaml.safe_load((tmp_path / f"model.{family}.yaml").read_text())
        assert cfg["MODEL"]["WEIGHTS"] == out_pkl
        assert os.access(tmp_path / f"model.{family}.sh", os.X_OK)
        assert f"model.{family}.yaml" in out


@pytest.mark.parametrize("argv, message", [
    (["--format", "onnx", "--run", "r1", "--method", "dino"], r"--format onnx: unknown; valid: detectron2"),
    (["--format", "detectron2", "--run", "nope", "--method", "dino"], r"--run nope: .* not found"),
    (["--format", "detectron2", "--run", "r1", "--method", "nope"], r"--method: unknown method 'nope'"),
    (["--format", "detectron2", "--run", "r1", "--method", "dino", "--backbone", "resnet18"],
     r"--backbone resnet18: does not match the checkpoint"),
])
def test_export_bad_input_is_one_line(r50_run, tmp_path, monkeypatch, capsys, argv, message):
    import re

    from bench.cli import main

    monkeypatch.chdir(r50_run[0])
    code = main(["export", *argv, "-o", str(tmp_path / "model.pkl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err


def test_export_vit_patch8_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from bench.cli import main

    monkeypatch.chdir(tmp_path)
    _fake_run(tmp_path, backbone="vit_tiny_d4_p8")
    code = main(["export", "--format", "detectron2", "--run", "r1", "--method", "dino", "-o", "vit.pkl"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "patch-16" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "vit.pkl").exists()


def test_det_backend_detectron2_missing_is_one_clear_line(capsys, tmp_path, monkeypatch):
    import importlib.util

    from bench.cli import main

    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed")
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--tasks", "det", "--set", "tasks.det.backend=detectron2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "detectron2 is not installed" in err and "pip install" in err and "backend=torchvision" in err


def test_d2_backend_up_to_the_subprocess(tmp_path, monkeypatch):
    """With detectron2 faked as present: weights, datasets, config and command are right; metrics come back."""
    from bench.data.synthetic import SyntheticConfig, SyntheticScenes
    from tasks import det
    from tasks.base import EvalData
    from tasks.detection import d2_backend

    monkeypatch.setattr(d2_backend, "require_detectron2", lambda where="tasks.det": None)
    seen = {}

    def fake_run(cmd, stdout, stderr, env):
        seen["cmd"] = cmd
        out = cmd[cmd.index("--metrics-out") + 1]
        with open(out, "w") as fh:
            json.dump({"bbox": {"AP": 12.5, "AP50": 30.0, "AP75": 10.0, "APs": 5.0, "APm": float("nan"),
                                "APl": float("nan"), "AP-disk": 3.0},
                       "segm": {"AP": 11.0, "AP50": 28.0, "AP75": 9.0, "APs": 4.0, "APm": 1.0, "APl": 2.0}}, fh)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(d2_backend.subprocess, "run", fake_run)
    cfg = det.DetConfig(iters=20, batch_size=2, d2_output=str(tmp_path / "work"))
    cfg.validate("tasks.det")
    ds_cfg = SyntheticConfig(num_train=4, num_val=3)
    data = EvalData("synthetic", SyntheticScenes(ds_cfg, "train"), SyntheticScenes(ds_cfg, "val"), 10, [])
    net = create_backbone("resnet18")
    res = d2_backend.run(cfg, net, data, [0, 1, 2, 3], [0, 1, 2], ["disk", "square", "triangle"])
    assert res.metrics["bbox_AP"] == 12.5 and res.metrics["segm_APl"] == 2.0 and len(res.metrics) == 12
    cmd = seen["cmd"]
    assert cmd[1:3] == ["-m", "tasks.detection.d2_train"]
    config = yaml.safe_load(open(cmd[cmd.index("--config-file") + 1]))
    assert config["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 3 and config["MODEL"]["RESNETS"]["DEPTH"] == 18
    assert config["SOLVER"]["MAX_ITER"] == 20 and config["SOLVER"]["IMS_PER_BATCH"] == 2
    assert config["DATASETS"] == {"TRAIN": ["bench_synthetic_train"], "TEST": ["bench_synthetic_val"]}
    regs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--register"]
    name, _, rest = regs[1].partition("=")
    json_path, _, root = rest.partition(":")
    gt = json.load(open(json_path))
    assert len(gt["images"]) == 3 and all(os.path.exists(os.path.join(root, im["file_name"])) for im in gt["images"])
    assert sum(len(data.val[i]["instances"]) for i in range(3)) == len(gt["annotations"])
    weights = d2_convert.read_pickle(config["MODEL"]["WEIGHTS"])["model"]
    assert torch.equal(torch.from_numpy(weights["res2.0.conv1.weight"]), net.model.layer1[0].conv1.weight)


def test_d2_train_without_detectron2_says_how_to_install(capsys):
    import importlib.util

    from tasks.detection import d2_train

    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed")
    assert d2_train.main(["--config-file", "x.yaml"]) == 2
    assert "pip install" in capsys.readouterr().err
