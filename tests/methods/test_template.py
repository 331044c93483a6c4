"""methods/_template.py is not registered by default, and works as a method once registered."""

import importlib

import pytest
import torch

from bench import checkpoint as ckpt
from bench.backbones import create_backbone
from bench.registry import METHODS


@pytest.fixture
def template():
    mod = importlib.import_module("methods._template")
    assert "template" not in METHODS  # files starting with "_" are skipped by the plugin loader
    METHODS.register("template")(mod.TemplateMethod)
    try:
        yield mod
    finally:
        METHODS.unregister("template")


def test_registered_template_pretrains_writes_final_pt_and_inits_a_backbone(template, tmp_path):
    import bench.pretrain as pretrain

    loop = {"method": "template", "method_cfg": {"proj_dim": 16, "global_size": 32}, "dataset": "synthetic",
            "pretrain": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "log_every": 1},
            "backbone": {}, "dataset_cfg": {"num_train": 8, "num_val": 2}, "seed": 1, "out_dir": str(tmp_path)}
    res = pretrain.train_loop(loop)
    assert res["steps"] == 2 and -1.0 <= res["final_loss"] <= 1.0
    final = ckpt.load_torch(str(tmp_path / "final.pt"))
    assert final["method"] == "template" and final["eval_backbone_prefix"] == "backbone."
    net = create_backbone("vit_tiny_d4_p8", init=str(tmp_path / "final.pt"))
    want = {k[len("backbone.model."):]: v for k, v in final["method_state"].items() if k.startswith("backbone.model.")}
    assert want and all(torch.equal(v, want[k]) for k, v in net.model.state_dict().items())


def test_template_loss_is_a_negative_cosine_that_training_lowers(template):
    from methods.base import Schedule
    from methods.build import build_method
    from bench.config import BackboneConfig

    torch.manual_seed(0)
    m = build_method("template", {"proj_dim": 16}, BackboneConfig(), Schedule(10, 10, 1))
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    losses = []
    for step in range(5):
        loss = m.training_step({"views": views}, step)["loss"]
        assert -1.0 <= float(loss.detach()) <= 1.0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
