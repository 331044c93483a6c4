"""A truncated or corrupt newest checkpoint: resume falls back to the previous one, with a warning."""

import json
import os

import torch

from bench import checkpoint as ckpt


def _save(folder, step):
    ckpt.save_torch({"step": step, "method": {"w": torch.full((3,), float(step))}, "optimizer": {}},
                    os.path.join(folder, f"step_{step:07d}.pt"))


def test_truncated_newest_falls_back_to_previous(tmp_path):
    _save(tmp_path, 4)
    _save(tmp_path, 8)
    newest = tmp_path / "step_0000008.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # cut short, as a full disk or an interrupted copy leaves it
    warnings = []
    state = ckpt.load_latest_step(str(tmp_path), warnings.append)
    assert state["step"] == 4 and torch.equal(state["method"]["w"], torch.full((3,), 4.0))
    assert len(warnings) == 1 and "step_0000008.pt" in warnings[0] and "resuming from step 4" in warnings[0]
    assert (tmp_path / "step_0000008.pt.corrupt").exists()  # kept for inspection, out of the way
    assert [s for s, _ in ckpt.step_checkpoints(str(tmp_path))] == [4]


def test_garbage_and_wrong_step_and_nothing_left(tmp_path):
    _save(tmp_path, 3)
    (tmp_path / "step_0000006.pt").write_bytes(os.urandom(256))
    torch.save({"step": 2}, tmp_path / "step_0000009.pt")  # loads, but is not the checkpoint of step 9
    warnings = []
    assert ckpt.load_latest_step(str(tmp_path), warnings.append)["step"] == 3
    assert len(warnings) == 2
    (tmp_path / "step_0000003.pt").write_bytes(b"")
    warnings.clear()
    assert ckpt.load_latest_step(str(tmp_path), warnings.append) is None
    assert "starting from step 0" in warnings[0]
    assert ckpt.load_latest_step(str(tmp_path / "missing")) is None


def test_train_loop_resumes_from_previous_when_newest_is_corrupt(tmp_path):
    """The real loop (no Ray): train 6 steps with checkpoints at 2 and 4, corrupt step 4, resume: it restarts at
    step 2 and ends at step 6 with the same metrics log as an uninterrupted run."""
    from bench.config import load_config
    from bench.loopconfig import loop_config
    from bench.pretrain import read_metrics, train_loop

    sets = ["pretrain.epochs=1", "pretrain.steps_per_epoch=6", "pretrain.batch_size=4", "pretrain.log_every=1",
            "pretrain.checkpoint_every=2", "data.synthetic.num_train=16", "data.synthetic.num_val=4"]
    cfg = load_config(None, sets, {"run": {"methods": ["dino"]}})
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = train_loop(loop_config(cfg, "dino", cfg.pretrain_for("dino"), str(ref_dir), 1))
    assert ref["steps"] == 6

    # an interrupted run: its checkpoints of steps 2 and 4 (from a copy trained with pruning off), the newest one
    # truncated, and its metrics log up to step 5
    loop = loop_config(cfg, "dino", cfg.pretrain_for("dino"), str(tmp_path / "full"), 1).to_dict()
    orig_prune = ckpt.prune
    try:
        ckpt.prune = lambda folder, keep=2: None
        train_loop(loop)
    finally:
        ckpt.prune = orig_prune
    ck = run_dir / "checkpoints"
    ck.mkdir(parents=True)
    for step in (2, 4):
        src = tmp_path / "full" / "checkpoints" / f"step_{step:07d}.pt"
        (ck / src.name).write_bytes(src.read_bytes())
    (ck / "step_0000004.pt").write_bytes((ck / "step_0000004.pt").read_bytes()[:64])
    ref_rows = read_metrics(str(ref_dir))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ref_rows if r["step"] <= 5))

    out = train_loop(dict(loop, out_dir=str(run_dir)))
    assert out["resumed_from"] == 2 and out["steps"] == 6
    rows = read_metrics(str(run_dir))
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [round(r["loss"], 5) for r in rows] == [round(r["loss"], 5) for r in ref_rows]
