"""``bench perf``'s cost table, op profile and GPU suite on CPU: tiny runs that check the report's shape and the
arithmetic (FLOP counts by hand, MFU), and the GPU suite's one-line refusal without a GPU. Never a speed assertion."""

import json

import pytest
import torch

from bench.errors import BenchError
from bench.perf import run_perf
from bench.perf.gpu import PAPER_SCALE, count_flops, mfu, paper_scale, peak_bf16_flops, require_gpu
from bench.perf.training import crop_overrides


def test_cost_table_tiny(tmp_path):
    rows = run_perf(["cost"], ["dino", "vice"], str(tmp_path / "perf"), tiny=True)["results"]["cost"]
    assert [(r["method"], r["crop"], r["batch"]) for r in rows] == [
        ("dino", 64, 4), ("dino", 96, 4), ("vice", 64, 4), ("vice", 96, 4)]
    for r in rows:
        assert r["step_s"] > 0 and r["images_per_s"] == pytest.approx(r["batch"] / r["step_s"])
        assert r["views_s"] > 0 and r["source_px"] >= 1.5 * r["crop"]
    assert rows[1]["overrides"] == "global_size=96 local_size=48"  # dino's 64/32 ratio kept
    assert rows[3]["overrides"] == "view_size=96 min_img_size=144"  # vice's 64/96 ratio kept
    md = (tmp_path / "perf.md").read_text()
    assert "## cost" in md and "| method | crop | batch | step_s |" in md


def test_crop_overrides_keep_ratios_on_the_patch_grid():
    assert crop_overrides({"global_size": 64, "local_size": 32}, 224, 8) == {"global_size": 224, "local_size": 112}
    assert crop_overrides({"global_size": 64, "local_size": 32}, 96, 16) == {"global_size": 96, "local_size": 48}
    assert crop_overrides({"global_size": 64}, 128, 8) == {"global_size": 128}  # CrOC: no local crops
    assert crop_overrides({"view_size": 64, "min_img_size": 96}, 224, 8) == {"view_size": 224, "min_img_size": 336}
    assert crop_overrides({"other": 1}, 224, 8) == {}


def test_profile_step_shares(monkeypatch):
    from bench import plugins
    from bench.config import load_config
    from bench.perf.headline import STEP_REGIONS, profile_step

    plugins.load_all()
    cfg = load_config(None, ["pretrain.batch_size=4", "methods.dino.out_dim=64", "methods.dino.n_local=1"],
                      {"run": {"methods": ["dino"]}})
    res = profile_step(cfg, "dino", 1)
    assert [r["region"] for r in res["regions"]] == list(STEP_REGIONS)
    assert sum(r["share"] for r in res["regions"]) == pytest.approx(1.0)
    assert all(r["ms"] > 0 for r in res["regions"] if r["region"] != "after_step")
    ops = res["top_ops"]
    assert ops and all(0 < o["share"] <= 1 for o in ops)
    assert ops == sorted(ops, key=lambda o: o["self_ms"], reverse=True)
    assert any("mm" in o["op"] or "linear" in o["op"] or "conv" in o["op"] for o in ops)


def test_profile_eval_splits_features_from_the_rest():
    from bench import plugins
    from bench.config import load_config
    from bench.perf.headline import profile_eval

    plugins.load_all()
    cfg = load_config(None, ["data.synthetic.num_train=16", "data.synthetic.num_val=8", "tasks.linseg.epochs=1",
                             "tasks.linseg.drop_at=1"], {"run": {"methods": ["dino"], "tasks": ["linseg"]}})
    res = profile_eval(cfg, 16)
    (feat, rest) = res["regions"]
    assert feat["ms"] > 0 and rest["ms"] > 0 and feat["share"] + rest["share"] == pytest.approx(1.0)
    assert json.dumps(res)  # plain data for perf.json


def test_flop_counter_matches_hand_count_and_mfu_arithmetic():
    lin = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32)
    assert count_flops(lambda: lin(x)) == 2 * 8 * 32 * 16  # one multiply-add = 2 FLOPs
    # forward + backward (grad of input and of weight): three matmuls of the same size
    assert count_flops(lambda: lin(x.requires_grad_()).sum().backward()) == 3 * 2 * 8 * 32 * 16
    assert mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)
    assert mfu(1e12, 0.5, None) != mfu(1e12, 0.5, None)  # NaN without a peak


def test_peak_table_prefers_specific_names():
    assert peak_bf16_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_bf16_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert peak_bf16_flops("Some Future GPU") is None
    assert peak_bf16_flops("Some Future GPU", 100.0) == pytest.approx(100e12)


def test_paper_scale_configs_are_valid_for_every_method():
    from bench import plugins
    from bench.config import build
    from bench.registry import BACKBONES, METHODS

    plugins.load_all()
    assert set(PAPER_SCALE) == set(METHODS.names())
    for method in METHODS.names():
        backbone, over, batch = paper_scale(method)
        assert backbone in BACKBONES.names() and batch > 0
        cls = METHODS.get(method)
        cfg = build(cls.config_class, over, f"methods.{method}")
        assert all(getattr(cfg, k) == v for k, v in over.items())
    with pytest.raises(BenchError, match="no paper-scale configuration for method 'nope'"):
        paper_scale("nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_suite_refuses_in_one_line_without_a_gpu(tmp_path, capsys):
    from bench.cli import main

    with pytest.raises(BenchError, match="bench perf --gpu: no CUDA GPU is visible"):
        require_gpu()
    assert main(["perf", "--gpu", "--out", str(tmp_path / "perf")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU is visible" in err[0]
    assert not (tmp_path / "perf-gpu.md").exists()


def test_headline_carries_the_profile_and_the_report_renders_it(tmp_path, monkeypatch):
    import types

    import bench.perf.headline as headline
    import bench.pipeline
    from bench.perf.report import to_markdown

    class FakePipeline:
        def __init__(self, cfg, progress=True):
            self.timings = types.SimpleNamespace(phases={"ray_start": 1.0, "pretrain_dino": 2.0, "total": 3.5})

        def run(self):
            return []

    step = {"method": "dino", "steps": 2, "batch": 8,
            "regions": [{"region": "views", "ms": 10.0, "share": 0.25}, {"region": "forward", "ms": 30.0,
                                                                         "share": 0.75}],
            "top_ops": [{"op": "aten::mm", "self_ms": 20.0, "share": 0.5, "calls": 4}]}
    seen = {}

    def fake_profile(cfg, methods, steps):
        seen["args"] = (list(cfg.run.methods), methods, steps)
        return {"steps": [step], "eval": {"regions": step["regions"], "top_ops": step["top_ops"]}}

    monkeypatch.setattr(bench.pipeline, "Pipeline", FakePipeline)
    monkeypatch.setattr(headline, "profile_headline", fake_profile)
    assert "profile" not in headline.bench_headline(["dino"], [])
    res = headline.bench_headline(["dino"], [], profile=True, profile_steps=2)
    assert seen["args"] == (["dino"], ["dino"], 2) and res["profile"]["steps"] == [step]
    md = to_markdown({"env": {"torch": "x"}, "results": {"headline": res}})
    assert "| pretrain_dino | 2 |" in md and "### dino: 2 training steps, batch 8" in md
    assert "| views | 10 | 25.0 % |" in md and "| aten::mm | 20 | 50.0 % | 4 |" in md
    assert "### linseg evaluation (untrained backbone)" in md
