"""``bench run`` end to end through Ray Train on a very small config: MLflow runs, leaderboard, resume."""

import os

import pytest

from bench.cli import main
from tests.support import tiny_argv


@pytest.fixture(scope="module")
def ray_session():
    yield
    import ray

    ray.shutdown()


def test_bench_run_end_to_end_then_resume_skips_everything(tmp_path, monkeypatch, capsys, ray_session):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--methods", "dino", "--tasks", "linseg", "--run-id", "e2e", "--no-progress"] + tiny_argv()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Leaderboard" in out and "dino" in out and "random-init" in out

    # files: final checkpoint, per-task results, leaderboard exports
    assert (tmp_path / "bench_runs" / "e2e" / "dino" / "final.pt").exists()
    assert (tmp_path / "results" / "e2e.md").exists() and (tmp_path / "results" / "e2e.csv").exists()
    md = (tmp_path / "results" / "e2e.md").read_text()
    assert "linseg/miou" in md and "random-init" in md

    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench")
    runs = client.search_runs([exp.experiment_id])
    kinds = sorted(r.data.tags["bench.kind"] for r in runs)
    assert kinds == ["eval", "eval", "pretrain", "run"]
    parent = [r for r in runs if r.data.tags["bench.kind"] == "run"][0]
    for r in runs:
        if r is not parent:
            assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED"
    evals = {r.data.tags["method"]: r for r in runs if r.data.tags["bench.kind"] == "eval"}
    assert set(evals) == {"dino", "random-init"}
    for r in evals.values():
        assert 0.0 <= r.data.metrics["linseg/miou"] <= 100.0
        assert r.data.tags["task"] == "linseg" and r.data.tags["dataset"] == "synthetic"
        assert r.data.tags["backbone"] == "vit_tiny_d4_p8"
    pre = [r for r in runs if r.data.tags["bench.kind"] == "pretrain"][0]
    assert pre.data.params["pretrain.steps_per_epoch"] == "3"
    history = client.get_metric_history(pre.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    arts = [a.path for a in client.list_artifacts(pre.info.run_id, "checkpoint")]
    assert arts == ["checkpoint/final.pt"]
    table = client.load_table(exp.experiment_id, "leaderboard.json", run_ids=[parent.info.run_id])
    assert set(table["method"]) == {"dino", "random-init"}
    # issue 17: every run says which recipe it ran; the synthetic default is `cpu`; the diff is logged
    from bench import recipes

    cpu_hash = recipes.builtin("dino")["cpu"].hash()
    for r in runs:
        assert r.data.tags["recipe"] == "cpu" and r.data.tags["recipe_changes"] != "0"
        if r.data.tags.get("method") == "dino":
            assert r.data.tags["recipe_hash"] == cpu_hash
    assert set(table["recipe"]) == {"cpu"} and "recipe" in md
    diff = client.download_artifacts(pre.info.run_id, "recipe_diff.json", str(tmp_path))
    import json

    rec = json.load(open(diff))
    assert rec["recipe"] == "cpu" and {"key": "methods.dino.n_local", "value": 2, "paper": 8} in rec["differs_from_paper"]
    assert "recipe_diff.json" in [a.path for a in client.list_artifacts(parent.info.run_id)]

    # `bench leaderboard` reprints the same numbers from MLflow
    assert main(["leaderboard", "--run-id", "e2e"]) == 0
    lb = capsys.readouterr().out
    assert f"{evals['dino'].data.metrics['linseg/miou']:.2f}" in lb

    # same run id again: nothing re-runs, nothing is logged twice
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "already finished" in out
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
