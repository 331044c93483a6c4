"""Several pretrainings in one worker group (bench.launch.train_sequence): each equals the same pretraining run alone,
a restarted sequence skips what finished, and the driver's per-job times and peak memory are per loop."""

import json
import os

import torch

from bench import checkpoint as ckpt
from bench.fitting import job_seconds
from bench.launch import train_sequence
from bench.pretrain import RESULT_FILE, PeakMemory, loop_result, read_metrics, train_loop


def _loop(method: str, out_dir: str, seed: int = 0) -> dict:
    return {"method": method, "method_cfg": {}, "dataset": "synthetic",
            "pretrain": {"epochs": 1, "steps_per_epoch": 3, "batch_size": 4, "log_every": 1, "loader_workers": 0},
            "backbone": {}, "dataset_cfg": {"num_train": 12, "num_val": 2}, "seed": seed, "out_dir": out_dir}


def _weights(out_dir: str) -> dict:
    return torch.load(os.path.join(out_dir, "final.pt"), weights_only=True)["method_state"]


def test_a_sequence_gives_each_pretraining_what_it_gives_alone(tmp_path):
    alone = str(tmp_path / "alone")
    train_loop(_loop("croc", alone))
    seq = [_loop("dino", str(tmp_path / "a")), _loop("croc", str(tmp_path / "b"))]
    results = train_sequence(seq)
    assert [r["steps"] for r in results] == [3, 3]
    assert [r["loss"] for r in read_metrics(alone)] == [r["loss"] for r in read_metrics(str(tmp_path / "b"))]
    ref, got = _weights(alone), _weights(str(tmp_path / "b"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    for out in ("a", "b"):  # what the driver reads, beside the checkpoint
        saved = ckpt.load_json(str(tmp_path / out / RESULT_FILE))
        assert saved["steps"] == 3 and saved["ended_at"] >= saved["started_at"]


def test_a_restarted_sequence_skips_finished_loops_and_resumes_the_rest(tmp_path):
    seq = [_loop("dino", str(tmp_path / "a")), _loop("croc", str(tmp_path / "b"))]
    first = train_sequence(seq[:1])[0]
    mtime = os.path.getmtime(tmp_path / "a" / "final.pt")
    results = train_sequence(seq)  # as a worker group restarted after the first loop finished
    assert os.path.getmtime(tmp_path / "a" / "final.pt") == mtime  # not trained again
    assert results[0]["ended_at"] == first["ended_at"] and results[1]["steps"] == 3
    assert [r["step"] for r in read_metrics(str(tmp_path / "a"))] == [1, 2, 3]


def test_loop_result_falls_back_to_what_the_fit_returned(tmp_path):
    assert loop_result(str(tmp_path), {"steps": 4}) == {"steps": 4}
    assert loop_result(str(tmp_path), None) == {}
    (tmp_path / RESULT_FILE).write_text(json.dumps({"steps": 9}))
    assert loop_result(str(tmp_path), {"steps": 4}) == {"steps": 9}


def test_job_seconds_charge_the_group_start_to_the_first_and_its_stop_to_the_last():
    box = {"wall0": 100.0, "seconds": 50.0}
    assert job_seconds(box, [{"ended_at": 120.0}]) == [50.0]  # one job: the whole fit
    got = job_seconds(box, [{"ended_at": 115.0}, {"ended_at": 130.0}, {"ended_at": 140.0}])
    assert got == [15.0, 15.0, 20.0] and sum(got) == box["seconds"]
    assert job_seconds(box, [{}, {"ended_at": 130.0}]) == [0.0, 50.0]  # no end time: the next job carries it


def test_peak_memory_is_this_loops_not_the_processes_earlier_peak():
    peak = PeakMemory(use_gpu=False)
    peak.sample()
    assert peak.sampled > 0
    peak.before = float("inf")  # the process peaked before this loop (an earlier loop of the worker group)
    assert peak.value() == peak.sampled
    peak.before = 0.0  # this loop raised the process's peak: the exact figure
    assert peak.value() == PeakMemory._maxrss() >= peak.sampled * 0.5
