"""The training loop in-process: deterministic resume from an atomic checkpoint."""

import os

import pytest
import torch

import bench.pretrain as pretrain
from bench import checkpoint as ckpt
from bench.errors import BenchError


def _loop_config(out_dir):
    return {"method": "dino", "method_cfg": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "n_local": 1},
            "pretrain": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 4, "checkpoint_every": 2, "log_every": 1},
            "backbone": {}, "dataset": "synthetic", "dataset_cfg": {"num_train": 16, "num_val": 2},
            "seed": 3, "out_dir": str(out_dir)}


class Crash(Exception):
    pass


def test_interrupted_run_resumes_from_checkpoint_and_matches_uninterrupted(tmp_path, monkeypatch):
    ref = pretrain.train_loop(_loop_config(tmp_path / "ref"))
    assert ref["steps"] == 6 and ref["resumed_from"] == 0

    real_save = pretrain._save_step

    def save_then_die(method, optimizer, step, ckpt_dir, rank):
        real_save(method, optimizer, step, ckpt_dir, rank)
        if step == 4:
            raise Crash("killed after the step-4 checkpoint")

    monkeypatch.setattr(pretrain, "_save_step", save_then_die)
    with pytest.raises(Crash):
        pretrain.train_loop(_loop_config(tmp_path / "run"))
    assert [s for s, _ in ckpt.step_checkpoints(tmp_path / "run" / "checkpoints")] == [2, 4]
    assert not (tmp_path / "run" / "final.pt").exists()
    monkeypatch.setattr(pretrain, "_save_step", real_save)

    res = pretrain.train_loop(_loop_config(tmp_path / "run"))
    assert res["resumed_from"] == 4 and res["steps"] == 6
    # metric lines after the checkpoint were dropped and logged again: one line per step, no duplicates
    steps = [r["step"] for r in pretrain.read_metrics(str(tmp_path / "run"))]
    assert steps == [1, 2, 3, 4, 5, 6]
    final = ckpt.load_torch(str(tmp_path / "ref" / "final.pt"))
    assert final["eval_backbone_prefix"] == "teacher.backbone."  # DINO evaluates its teacher; --init reads this
    a = final["method_state"]
    b = ckpt.load_torch(str(tmp_path / "run" / "final.pt"))["method_state"]
    assert a.keys() == b.keys()
    for k in a:  # same data order, same augmentations, same optimiser state: identical weights
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_atomic_write_leaves_previous_file_when_writer_dies(tmp_path):
    path = tmp_path / "x.pt"
    ckpt.save_torch({"v": torch.tensor(1)}, str(path))

    def die(fh):
        fh.write(b"partial")
        raise RuntimeError("process died mid-write")

    with pytest.raises(RuntimeError):
        ckpt.atomic_write_bytes(str(path), die)
    assert int(ckpt.load_torch(str(path))["v"]) == 1
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")] == []


def test_corrupted_checkpoint_is_one_clear_error(tmp_path):
    bad = tmp_path / "step_0000002.pt"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(BenchError, match=r"step_0000002\.pt: corrupted or not a torch checkpoint"):
        ckpt.load_torch(str(bad))


def test_epoch_sampler_shards_and_resumes_mid_epoch():
    full = list(pretrain.EpochSampler(10, 2, 3, rank=0, world=1, seed=0))
    assert len(full) == 6 and len(set(full)) == 6
    r0 = list(pretrain.EpochSampler(10, 1, 3, rank=0, world=2, seed=0))
    r1 = list(pretrain.EpochSampler(10, 1, 3, rank=1, world=2, seed=0))
    assert not set(r0) & set(r1)
    s = pretrain.EpochSampler(10, 2, 3, rank=0, world=1, seed=0)
    s.set_position(0, 1)
    assert list(s) == full[2:]
    s.set_position(1, 0)
    assert all(k >= 10 for k in s)  # epoch 1 keys are offset by N
