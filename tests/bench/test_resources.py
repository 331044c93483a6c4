"""Resource checks before work starts (bench.resources): pure packing logic against hand-made clusters, the
one-line messages, the autoscaler wait, and (slow) a real local Ray refusing ``--gpu`` and ``--workers 64``."""

import os
import subprocess
import sys
import time

import pytest

from bench.config import PretrainConfig
from bench.errors import BenchError
from bench.resources import ClusterView, Request, check_pretrain, fits, pack, pretrain_request, require

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAPTOP = ClusterView(nodes=[{"CPU": 2.0}])
TWO_GPU_NODES = ClusterView(nodes=[{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}])


def _line(exc) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


def test_pack_places_each_bundle_on_one_node():
    assert pack([{"CPU": 2}, {"CPU": 2}], [{"CPU": 2}, {"CPU": 2}])
    assert not pack([{"CPU": 3}], [{"CPU": 2}, {"CPU": 2}])  # 4 CPUs in total, but no node holds 3
    assert not pack([{"CPU": 1}] * 3, [{"CPU": 2}])
    assert pack([{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}], TWO_GPU_NODES.nodes)
    assert not pack([{"CPU": 1, "GPU": 1}] * 3, TWO_GPU_NODES.nodes)
    assert pack([], [])


def test_gpu_on_a_machine_without_gpu_is_one_line_naming_the_flag():
    with pytest.raises(BenchError) as exc:
        check_pretrain(PretrainConfig(gpu=True), "pretraining 'dino'", view_fn=lambda: LAPTOP)
    line = _line(exc)
    assert line.startswith("--gpu: pretraining 'dino' asks for 1 worker(s) × 1 GPU")
    assert "2 CPUs and no GPU on 1 node" in line and "drop --gpu" in line


def test_too_many_workers_names_the_most_that_fit():
    with pytest.raises(BenchError) as exc:
        check_pretrain(PretrainConfig(workers=64, batch_size=64), "pretraining 'dino'", view_fn=lambda: LAPTOP)
    line = _line(exc)
    # 64 workers × max(1, 2 // 64) = 1 CPU each, as bench.pipeline sizes them
    assert line.startswith("--workers 64: pretraining 'dino' asks for 64 worker(s) × 1 CPU = 64 CPUs")
    assert "the Ray cluster has 2 CPUs and no GPU on 1 node" in line and "--workers 2 or fewer" in line


def test_gpus_per_worker_and_cpus_per_worker_limits():
    with pytest.raises(BenchError) as exc:
        check_pretrain(PretrainConfig(workers=4, gpu=True, batch_size=32), "x", view_fn=lambda: TWO_GPU_NODES)
    assert "asks for 4 GPUs" in _line(exc) and "--workers 2 or fewer" in str(exc.value)
    with pytest.raises(BenchError) as exc:
        check_pretrain(PretrainConfig(cpus_per_worker=12), "x", view_fn=lambda: TWO_GPU_NODES)
    assert _line(exc).startswith("pretrain.cpus_per_worker 12:") and "largest node has 8" in str(exc.value)
    # what fits passes and returns the cluster it saw
    assert check_pretrain(PretrainConfig(workers=2, gpu=True, batch_size=32), "x",
                          view_fn=lambda: TWO_GPU_NODES) is TWO_GPU_NODES
    assert check_pretrain(PretrainConfig(workers=2, cpus_per_worker=1, batch_size=32), "x", view_fn=lambda: LAPTOP)


def test_batch_not_divisible_by_workers_fails_before_ray_train():
    with pytest.raises(BenchError) as exc:
        check_pretrain(PretrainConfig(workers=3, batch_size=32, cpus_per_worker=1), "x",
                       view_fn=lambda: ClusterView([{"CPU": 4.0}]))
    assert "pretrain.batch_size 32 must be divisible" in _line(exc)


def test_fixed_cluster_fails_at_once_without_waiting():
    req = pretrain_request(PretrainConfig(gpu=True), "x", 1)
    slept = []
    t0 = time.monotonic()
    with pytest.raises(BenchError):
        require(req, lambda: LAPTOP, timeout_s=600, sleep=slept.append)
    assert slept == [] and time.monotonic() - t0 < 1


def test_autoscaling_cluster_waits_saying_so_until_the_nodes_arrive():
    req = pretrain_request(PretrainConfig(workers=2, gpu=True, batch_size=32), "pretraining 'dino'", 4)
    views = iter([ClusterView([{"CPU": 2.0}], {"CPU": 64, "GPU": 8})] * 3
                 + [ClusterView([{"CPU": 2.0}, {"CPU": 8.0, "GPU": 4.0}], {"CPU": 64, "GPU": 8})])
    said, slept, asked = [], [], []
    got = require(req, lambda: next(views), timeout_s=600, say=said.append, sleep=slept.append, ask=asked.append)
    assert got.total("GPU") == 4 and len(slept) == 3
    assert said[0].startswith("waiting up to 600s (run.resource_timeout_s) for the autoscaler: --gpu")
    assert said[-1].startswith("the cluster now has 10 CPUs and 4 GPUs on 2 nodes")
    assert asked == [req, None]  # asked the autoscaler for the bundles, then withdrew the request


def test_autoscaling_cluster_times_out_or_refuses_beyond_its_maximum():
    req = pretrain_request(PretrainConfig(gpu=True), "x", 1)
    small = ClusterView([{"CPU": 2.0}], {"CPU": 16, "GPU": 2})
    clock = {"t": 0.0}

    def sleep(s):
        clock["t"] += s
        time.sleep(0.01)

    with pytest.raises(BenchError) as exc:
        require(req, lambda: small, timeout_s=0.05, say=lambda _: None, sleep=sleep)
    assert "still after waiting 0s for the autoscaler" in _line(exc)
    with pytest.raises(BenchError) as exc:
        require(req, lambda: ClusterView([{"CPU": 2.0}], {"CPU": 16}), timeout_s=600, sleep=sleep)
    assert "more than this autoscaling cluster's maximum size" in _line(exc)


def test_eval_task_must_fit_one_node():
    req = Request("x", bundles=[{"CPU": 1.0}], task={"CPU": 1.0, "GPU": 1.0})
    assert not fits(req, ClusterView([{"CPU": 2.0}, {"GPU": 1.0}]))  # the GPU node has no CPU for it
    assert fits(req, ClusterView([{"CPU": 2.0}, {"CPU": 1.0, "GPU": 1.0}]))


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--gpu"], ["--workers", "64", "--set", "pretrain.batch_size=64"]])
def test_bench_run_on_a_local_ray_refuses_within_seconds(tmp_path, flags):
    import torch

    if flags == ["--gpu"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "--methods", "dino", "--tasks", "linseg",
                           "--no-progress", "--set", "data.synthetic.num_train=16", "--set", "data.synthetic.num_val=8",
                           *flags], cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                          text=True, timeout=300)
    elapsed = time.monotonic() - t0
    err = [ln for ln in proc.stderr.strip().splitlines() if " INFO mlflow" not in ln]  # a new store's notes
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith(f"error: {flags[0]}"), proc.stderr
    assert "the Ray cluster has" in err[0] and "Traceback" not in proc.stderr
    # Ray's start included (about 10 s on an idle 2-core machine; a shared one is slower); before: still
    # waiting after 180 s
    assert elapsed < 150
