"""`bench perf` runs on tiny sizes and writes a well-formed report (never a speed assertion)."""

import json

import pytest

from bench.errors import BenchError
from bench.perf import run_perf


def test_perf_tiny_writes_json_and_markdown(tmp_path):
    out = tmp_path / "perf"
    report = run_perf(["sinkhorn", "kmeans", "data"], ["dino"], str(out), tiny=True)
    data = json.loads((tmp_path / "perf.json").read_text())
    assert data["env"]["torch"] and data["env"]["device"]
    assert {"sinkhorn", "kmeans", "data"} == set(data["results"])
    swav, croc = data["results"]["sinkhorn"]
    for row in (swav, croc):
        assert row["ours_s"] > 0 and row["pot_s"] > 0 and row["speedup"] > 0
    # same algorithm, same iterations, same final scaling: the prototype-marginal errors agree
    assert abs(swav["ours_marginal_err"] - swav["pot_marginal_err"]) < 1e-6
    # the batched plan and POT per problem: both within the same small error after 5 iterations
    assert croc["ours_marginal_err"] < 0.5 and croc["pot_marginal_err"] < 0.5
    (row,) = data["results"]["kmeans"]
    # our k-means against scikit-learn: equal inertia within 10 %
    assert 0.9 < row["inertia_ratio"] < 1.1
    assert row["inertia_ratio"] == row["torch_inertia"] / row["sklearn_inertia"]
    assert row["torch_s"] > 0 and row["speedup_vs_sklearn"] == row["sklearn_s"] / row["torch_s"]
    (row,) = data["results"]["data"]
    assert row["method"] == "dino" and row["bottleneck"] in ("data", "model")
    md = (tmp_path / "perf.md").read_text()
    assert "## sinkhorn" in md and "## kmeans" in md and "Environment:" in md
    assert report["results"]["data"][0]["step_images_per_s"] > 0


def test_unknown_benchmark_is_one_line(tmp_path):
    with pytest.raises(BenchError, match="--only: unknown benchmark gpu.*the GPU suite is --gpu"):
        run_perf(["gpu"], ["dino"], str(tmp_path / "p"), tiny=True)
    with pytest.raises(BenchError, match="--profile profiles the headline"):
        run_perf(["kmeans"], ["dino"], str(tmp_path / "p"), tiny=True, profile=True)


@pytest.mark.slow
def test_perf_ray_headline_and_tune_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = run_perf(["ray", "headline", "tune"], ["dino"], str(tmp_path / "perf"), tiny=True, profile=True)
    (row,) = report["results"]["tune"]
    assert row["status"] == "completed" and row["direct_s"] > 0 and row["trial_s"] > 0
    assert row["search_s"] >= row["trial_s"]
    (row,) = report["results"]["ray"]
    assert row["ratio"] > 0 and row["direct_images_per_s"] > 0
    assert row["local_ratio"] > 0 and row["ray_up_for_local"] is False  # local mode measured before Ray starts
    phases = report["results"]["headline"]["phases_s"]
    assert {"pretrain_dino", "eval_dino", "logging", "total"} <= set(phases)  # Ray was started by `ray` before
    prof = report["results"]["headline"]["profile"]
    (step,) = prof["steps"]
    assert step["method"] == "dino" and step["top_ops"] and len(prof["eval"]["regions"]) == 2
    md = (tmp_path / "perf.md").read_text()
    assert "### dino: 2 training steps" in md and "### linseg evaluation" in md


@pytest.mark.slow
def test_perf_scaling_tiny(tmp_path):
    (row,) = run_perf(["scaling"], ["dino"], str(tmp_path / "perf"), tiny=True)["results"]["scaling"]
    assert row["w1x1_images_per_s"] > 0 and row["w2x1_images_per_s"] > 0 and row["w1x2threads_images_per_s"] > 0
    assert row["scaling_efficiency"] == pytest.approx(row["w2x1_images_per_s"] / (2 * row["w1x1_images_per_s"]))


@pytest.mark.slow
def test_perf_loader_tiny(tmp_path):
    (row,) = run_perf(["loader"], ["dino"], str(tmp_path / "perf"), tiny=True)["results"]["loader"]
    assert row["in_process_images_per_s"] > 0 and row["one_worker_images_per_s"] > 0
    assert row["worker_speedup"] == pytest.approx(row["one_worker_images_per_s"] / row["in_process_images_per_s"])
