"""The CPU default pretrains in the bench process through Ray Train's local mode (bench.fitting.run_locally /
run_here): when that applies, that the loop really runs here with no Ray started, that a failure restarts it
from its checkpoint as Ray Train would, and that a failure which comes back at the same step fails fast."""

import json
import os
import types

import pytest

from bench.fitting import run_locally


def _p(workers=1, gpu=False, cpus=0, local_mode="auto"):
    return types.SimpleNamespace(workers=workers, gpu=gpu, cpus_per_worker=cpus, local_mode=local_mode)


CASES = [  # (pretrain configs, --address, runs in this process)
    ([_p()], "", True),
    ([_p()] * 3, "", True),  # the headline: three methods one after the other
    ([_p()], "local", True),
    ([_p(cpus=1)] * 3, "", False),  # two fit side by side on 2 CPUs: worker groups
    ([_p(cpus=2)] * 3, "", True),  # one at a time
    ([_p(cpus=1), _p()], "", True),  # one of them takes every CPU: one at a time, as bench.fitting.concurrency says
    ([_p()], "auto", False),  # a joined cluster: the work goes to its nodes
    ([_p()], "ray://head:10001", False),
    ([_p(workers=2)], "", False),  # data parallel
    ([_p(gpu=True)], "", False),
    ([_p(local_mode="never")], "", False),
    ([_p(), _p(local_mode="never")], "", False),
    ([], "", False),
]


def test_case_list_is_not_empty():
    assert len(CASES) >= 10


@pytest.mark.parametrize("pcfgs,address,here", CASES)
def test_when_pretraining_runs_in_this_process(pcfgs, address, here, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert run_locally(pcfgs, address) is here


def test_local_mode_is_a_checked_setting():
    from bench.config import load_config
    from bench.errors import BenchError

    assert load_config(None, []).pretrain.local_mode == "auto"
    assert load_config(None, ["pretrain.local_mode=never"]).pretrain.local_mode == "never"
    with pytest.raises(BenchError, match=r"pretrain.local_mode = 'always': expected one of auto, never"):
        load_config(None, ["pretrain.local_mode=always"])
    with pytest.raises(BenchError, match=r"pretrain.precision = 'fp16': expected one of auto, fp32, bf16"):
        load_config(None, ["pretrain.precision=fp16"])


def test_local_mode_is_left_out_of_the_cache_keys():
    from bench.cache import pretrain_key

    loop = {"method": "dino", "pretrain": {"lr": 1e-3, "local_mode": "auto", "cpus_per_worker": 2},
            "dataset_cfg": {}}
    other = {**loop, "pretrain": {"lr": 1e-3, "local_mode": "never", "cpus_per_worker": 1}}
    assert pretrain_key(loop, code="c") == pretrain_key(other, code="c")
    assert pretrain_key(loop, code="c") != pretrain_key({**loop, "pretrain": {"lr": 2e-3}}, code="c")


SETS = ["pretrain.epochs=1", "pretrain.steps_per_epoch=6", "pretrain.batch_size=8", "pretrain.log_every=1",
        "pretrain.checkpoint_every=2", "data.synthetic.num_train=64", "data.synthetic.num_val=8",
        "tasks.linseg.epochs=1", "run.baseline=false"]


def _pipeline(tmp_path, monkeypatch, run_id, *extra):
    from bench.config import load_config
    from bench.pipeline import Pipeline

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, SETS + list(extra), {"run": {"methods": ["dino"], "tasks": ["linseg"], "run_id": run_id}})
    return Pipeline(cfg, progress=False), tmp_path / "bench_runs" / run_id / "dino"


def _steps(out_dir):
    return [json.loads(ln)["step"] for ln in open(out_dir / "metrics.jsonl")]


def test_the_cpu_default_trains_in_this_process_before_ray_starts(tmp_path, monkeypatch):
    import ray

    import bench.pretrain

    seen = {}
    real = bench.pretrain.train_loop

    def loop(config):
        seen["ray_up"] = ray.is_initialized()
        return real(config)

    monkeypatch.setattr(bench.pretrain, "train_loop", loop)
    pipe, out_dir = _pipeline(tmp_path, monkeypatch, "here")
    try:
        rows = pipe.run()
    finally:
        ray.shutdown()
    assert seen == {"ray_up": False}  # Ray starts for the evaluations only
    assert json.loads((out_dir / "workers" / "rank_0.json").read_text())["pid"] == os.getpid()
    assert _steps(out_dir) == list(range(1, 7))
    assert not (tmp_path / "bench_runs" / "here" / "ray").exists()  # no worker group's run state
    assert [r.method for r in rows] == ["dino"] and rows[0].metrics["miou"] > 0
    assert pipe.timings.phases["pretrain_dino"] > 0 and "ray_start" in pipe.timings.phases


def test_a_failure_restarts_the_loop_from_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    import ray

    import bench.pretrain

    real = bench.pretrain._save_step
    failed = []

    def save_then_fail_once(method, optimizer, step, ckpt_dir, rank):
        real(method, optimizer, step, ckpt_dir, rank)
        if step == 4 and not failed:
            failed.append(step)
            raise OSError("the disk went away for a moment")

    monkeypatch.setattr(bench.pretrain, "_save_step", save_then_fail_once)
    pipe, out_dir = _pipeline(tmp_path, monkeypatch, "again", "pretrain.max_failures=1")
    try:
        pipe.run()
    finally:
        ray.shutdown()
    assert failed == [4]
    assert _steps(out_dir) == list(range(1, 7))  # resumed at 4: no step lost or logged twice
    assert json.loads((out_dir / "loop_result.json").read_text())["resumed_from"] == 4
    out = capsys.readouterr().out
    assert "pretraining 'dino' failed at step 4 (OSError: the disk went away for a moment); restarting" in out


def test_a_failure_that_comes_back_at_the_same_step_fails_fast(tmp_path, monkeypatch):
    import ray

    import bench.pretrain
    from bench.errors import BenchError

    real = bench.pretrain._report
    calls = []

    def always_fail_at_5(ctx, metrics):
        real(ctx, metrics)
        if metrics["step"] == 5:
            calls.append(metrics["step"])
            raise OSError("no space left")

    monkeypatch.setattr(bench.pretrain, "_report", always_fail_at_5)
    pipe, out_dir = _pipeline(tmp_path, monkeypatch, "stuck", "pretrain.max_failures=-1")  # -1: unlimited
    try:
        with pytest.raises(BenchError, match=r"pretraining 'dino' failed: no space left; re-run with "
                                             r"--run-id stuck"):
            pipe.run()
    finally:
        ray.shutdown()
    assert calls == [5, 5]  # one restart (from step 4), then the same step again: no further attempts
    assert (out_dir / "checkpoints" / "step_0000004.pt").exists()  # what a re-run resumes from


def test_a_restarted_sequence_skips_the_finished_loop_and_names_the_failed_one(tmp_path, monkeypatch, capsys):
    import ray

    import bench.pretrain
    from bench.config import load_config
    from bench.pipeline import Pipeline

    real = bench.pretrain._save_step
    failed, dino_final = [], []

    def croc_fails_once(method, optimizer, step, ckpt_dir, rank):
        real(method, optimizer, step, ckpt_dir, rank)
        if step == 4 and os.sep + "croc" + os.sep in ckpt_dir + os.sep and not failed:
            failed.append(step)
            dino_final.append(os.stat(tmp_path / "bench_runs" / "seq" / "dino" / "final.pt").st_mtime_ns)
            raise OSError("transient")

    monkeypatch.setattr(bench.pretrain, "_save_step", croc_fails_once)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, SETS, {"run": {"methods": ["dino", "croc"], "tasks": ["linseg"], "run_id": "seq"}})
    pipe = Pipeline(cfg, progress=False)
    try:
        pipe.run()
    finally:
        ray.shutdown()
    run = tmp_path / "bench_runs" / "seq"
    assert failed == [4]
    assert "pretraining 'croc' failed at step 4 (OSError: transient); restarting" in capsys.readouterr().out
    assert os.stat(run / "dino" / "final.pt").st_mtime_ns == dino_final[0]  # finished before: not trained again
    assert json.loads((run / "croc" / "loop_result.json").read_text())["resumed_from"] == 4
    assert _steps(run / "dino") == list(range(1, 7)) and _steps(run / "croc") == list(range(1, 7))
