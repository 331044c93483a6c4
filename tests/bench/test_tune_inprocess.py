"""A single-worker tune trial's loop in its own process (bench/tune/inprocess.py): every metrics row reaches
Tune once, in step order, resumed rows only after the checkpoint, the loop's error surfaces; trial resources."""

import json
import os
import threading
import time

import pytest

import bench.pretrain
from bench import checkpoint as ckpt
from bench.tune.constants import DRIVER_CPU
from bench.tune.inprocess import train_in_process
from bench.tune.trial import in_process, trial_resources


def _fake_loop(rows, fail=None, threads=None):
    def loop(cfg):
        if threads is not None:
            threads.append(threading.current_thread().name)
        path = os.path.join(cfg["out_dir"], "metrics.jsonl")
        for r in rows:
            with open(path, "a") as fh:
                fh.write(json.dumps(r) + "\n")
            time.sleep(0.03)
        if fail:
            raise fail
        return {"wall_s": 1.5, "steps": rows[-1]["step"]}
    return loop


def test_forwards_every_new_row_once_in_order(tmp_path, monkeypatch):
    rows = [{"step": s, "loss": 1.0 / s, **({"proxy": 10.0 * s} if s % 2 == 0 else {})} for s in range(1, 7)]
    names = []
    monkeypatch.setattr(bench.pretrain, "train_loop", _fake_loop(rows, threads=names))
    got = []
    out = train_in_process({"out_dir": str(tmp_path)}, got.append, poll_s=0.01)
    assert got == rows and out == {"wall_s": 1.5, "steps": 6}
    assert names == ["bench-train-loop"]  # the loop ran in its own thread; reports came from this one


def test_resume_drops_and_skips_rows_after_the_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    ckpt.save_torch({"step": 4}, str(tmp_path / "checkpoints" / "step_0000004.pt"))
    old = [{"step": s, "loss": 9.0} for s in range(1, 7)]  # steps 5, 6 were logged after the checkpoint
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert [s for s, _ in ckpt.step_checkpoints(str(tmp_path / "checkpoints"))] == [4]
    new = [{"step": s, "loss": 1.0} for s in (5, 6, 7, 8)]
    monkeypatch.setattr(bench.pretrain, "train_loop", _fake_loop(new))
    got = []
    train_in_process({"out_dir": str(tmp_path)}, got.append, poll_s=0.01)
    assert got == new  # nothing at or before the checkpoint again, each resumed step once
    kept = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5, 6, 7, 8] and all(r["loss"] == 9.0 for r in kept[:4])


def test_the_loops_error_reaches_the_trial_after_its_rows(tmp_path, monkeypatch):
    rows = [{"step": 1, "loss": 2.0}]
    monkeypatch.setattr(bench.pretrain, "train_loop", _fake_loop(rows, fail=FloatingPointError("loss is nan")))
    got = []
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train_in_process({"out_dir": str(tmp_path)}, got.append, poll_s=0.01)
    assert got == rows


@pytest.mark.parametrize("workers,cpw,gpu,expected", [
    (1, 2, False, {"CPU": 2}),  # the default: the trial holds its CPUs and trains itself
    (1, 4, True, {"CPU": 4, "GPU": 1}),
    (2, 4, False, {"CPU": DRIVER_CPU}),  # a worker group: the trial only drives it
])
def test_trial_resources(workers, cpw, gpu, expected):
    assert in_process(workers) == (workers == 1)
    assert trial_resources(workers, cpw, gpu) == expected


def test_real_loop_rows_match_its_metrics_file(tmp_path):
    from bench.config import load_config, to_dict

    sets = ["pretrain.epochs=1", "pretrain.steps_per_epoch=3", "pretrain.batch_size=4", "pretrain.log_every=1",
            "pretrain.checkpoint_every=100", "data.synthetic.num_train=16", "methods.dino.out_dim=64",
            "methods.dino.hidden_dim=32", "methods.dino.bottleneck_dim=16", "methods.dino.n_local=1"]
    cfg = load_config(None, sets, {"run": {"methods": ["dino"]}})
    loop = {"method": "dino", "method_cfg": to_dict(cfg.methods["dino"]), "pretrain": to_dict(cfg.pretrain_for("dino")),
            "backbone": to_dict(cfg.backbone), "dataset": "synthetic", "dataset_cfg": to_dict(cfg.data["synthetic"]),
            "seed": 0, "out_dir": str(tmp_path)}
    got = []
    out = train_in_process(loop, got.append, poll_s=0.05)
    assert out["steps"] == 3 and [r["step"] for r in got] == [1, 2, 3]
    assert got == bench.pretrain.read_metrics(str(tmp_path)) and (tmp_path / "final.pt").exists()
