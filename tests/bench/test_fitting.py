"""How many pretrainings ``bench run`` starts at once (seeds side by side), and that two really run together."""

import os
import types

import pytest

from bench.fitting import concurrency


def _p(gpu=False, workers=1, cpus=0):
    return types.SimpleNamespace(gpu=gpu, workers=workers, cpus_per_worker=cpus)


def test_concurrency_from_the_cluster_resources(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 8.0})
    assert concurrency([_p()]) == 1  # one pretraining: nothing to schedule
    assert concurrency([_p()] * 3) == 1  # CPU, cpus_per_worker unset: each pretraining takes every CPU
    assert concurrency([_p(cpus=4)] * 5) == 4  # 16 CPUs / 4
    assert concurrency([_p(cpus=4, workers=2)] * 5) == 2
    assert concurrency([_p(gpu=True, workers=2)] * 3) == 3  # 8 GPUs hold 4 two-GPU pretrainings; 3 asked
    assert concurrency([_p(gpu=True, workers=4)] * 3) == 2
    assert concurrency([_p(gpu=True, workers=16)] * 3) == 1  # never below one
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert concurrency([_p(gpu=True)] * 2) == 1


@pytest.mark.slow
def test_two_seeds_pretrain_side_by_side_on_two_cpus(tmp_path, monkeypatch, capsys):
    import json

    from bench.cli import main
    from tests.support import tiny_argv

    monkeypatch.chdir(tmp_path)
    try:
        assert main(["run", "--methods", "dino", "--tasks", "linseg", "--seeds", "2", "--run-id", "par",
                     "--no-progress", "--no-baseline", "--set", "pretrain.cpus_per_worker=1"] + tiny_argv()) == 0
    finally:
        import ray

        ray.shutdown()
    spans = []
    for seed in (0, 1):
        rows = [json.loads(ln) for ln in open(tmp_path / "bench_runs" / "par" / "dino" / f"seed{seed}" /
                                               "metrics.jsonl")]
        assert [r["step"] for r in rows] == [1, 2, 3]
        w = json.load(open(tmp_path / "bench_runs" / "par" / "dino" / f"seed{seed}" / "workers" / "rank_0.json"))
        spans.append((os.path.getmtime(tmp_path / "bench_runs" / "par" / "dino" / f"seed{seed}" / "workers" /
                                       "rank_0.json"), os.path.getmtime(tmp_path / "bench_runs" / "par" / "dino" /
                                                                        f"seed{seed}" / "final.pt"), w))
    (s0, e0, _), (s1, e1, _) = spans
    assert s1 < e0 and s0 < e1  # the two pretrainings overlapped in time
