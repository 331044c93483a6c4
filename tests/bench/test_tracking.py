"""bench.tracking: the tag vocabulary, the resumable run ledger, and a store that fails mid-run (removed,
locked, full) turning the tracker offline instead of failing the run."""

import errno
import os
import sqlite3
import threading
import time

import pytest

from bench.tracking import TAG, RunLedger, Tracker, run_tags


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One sqlite store for the module (creating one costs seconds); each test uses its own experiment."""
    path = tmp_path_factory.mktemp("store") / "m.db"
    Tracker(f"sqlite:///{path}", "setup")
    return path


def test_run_tags_use_the_vocabulary_and_mirror_the_commit():
    tags = run_tags("eval", "r1", method="dino", task="linseg", seed=3, protocol_hash="abc", git_commit="c0ffee")
    assert tags == {"bench.kind": "eval", "bench.run_id": "r1", "git_commit": "c0ffee",
                    "mlflow.source.git.commit": "c0ffee", "method": "dino", "task": "linseg", "bench.seed": "3",
                    "bench.protocol_hash": "abc"}
    assert run_tags("run", "r1", init=None, git_commit="x") == {"bench.kind": "run", "bench.run_id": "r1",
                                                               "git_commit": "x", "mlflow.source.git.commit": "x"}
    with pytest.raises(KeyError):
        run_tags("eval", "r1", mehtod="dino")  # a typo is a bug, not a new tag
    assert len(set(TAG.values())) == len(TAG)


def test_ledger_reuses_finished_and_parent_runs_and_replaces_unfinished_stages(tmp_path, db):
    tracker = Tracker(f"sqlite:///{db}", "ledger")
    ledger = RunLedger(str(tmp_path), tracker)
    parent, done = ledger.stage("parent", "p", run_tags("run", "r", git_commit="x"))
    assert not done
    a, _ = ledger.stage("eval/dino/linseg", "e", run_tags("eval", "r", git_commit="x"), parent)
    tracker.log_metrics(a, {"linseg/miou": 1.0})
    tracker.finish(a)
    b, _ = ledger.stage("pretrain/dino", "t", run_tags("pretrain", "r", git_commit="x"), parent)
    tracker.log_metrics(b, {"half": 1.0})  # interrupted while logging: not finished
    again = RunLedger(str(tmp_path), tracker)  # a re-run reads mlflow.json
    assert again.stage("parent", "p", {}) == (parent, False)
    assert again.stage("eval/dino/linseg", "e", {}, parent) == (a, True)
    b2, done = again.stage("pretrain/dino", "t", run_tags("pretrain", "r", git_commit="x"), parent)
    assert b2 != b and not done
    assert tracker.run_status(b) == "MISSING"  # the half-logged run is gone: nothing is logged twice
    assert sorted(again.unlogged()) == ["parent", "pretrain/dino"]


def _broken(tracker, how, path):
    if how == "removed":
        os.remove(path)
    elif how == "full":
        def full(*_a, **_k):
            raise OSError(errno.ENOSPC, "No space left on device")
        tracker.client.log_batch = full
        tracker.client.set_terminated = full


FAULTS = ["removed", "full"]  # "locked": its own test below


def test_fault_list_is_not_empty():
    assert FAULTS


@pytest.mark.parametrize("how", FAULTS)
def test_store_failing_mid_run_turns_the_tracker_offline_once(tmp_path, how, db):
    said = []
    if how == "removed":  # its own store, to remove
        db = tmp_path / "m.db"
    tracker = Tracker(f"sqlite:///{db}", f"offline-{how}", on_offline=said.append)
    rid = tracker.start_run("a", {"k": "v"})
    tracker.log_metrics(rid, {"m": 1.0})
    _broken(tracker, how, str(db))
    tracker.log_metrics(rid, {"m": 2.0})  # no exception
    tracker.log_params(rid, {"p": 1})
    tracker.finish(rid)
    assert tracker.offline and len(said) == 1
    assert ("readonly" in said[0] or "no such table" in said[0]) if how == "removed" else "No space" in said[0]
    assert tracker.start_run("b", {}) is None and tracker.run_status(rid) == "OFFLINE"
    ledger = RunLedger(str(tmp_path), tracker)
    assert ledger.stage("eval/x", "x", {}) == (None, False)
    if how == "removed":  # the same command again, in this process: a new store at the same path works
        fresh = Tracker(f"sqlite:///{db}", f"offline-{how}")
        rid2 = fresh.start_run("b", {})
        fresh.log_metrics(rid2, {"m": 3.0})
        assert not fresh.offline and fresh.client.get_run(rid2).data.metrics["m"] == 3.0


@pytest.mark.slow
def test_a_short_lock_is_waited_for_and_a_long_one_goes_offline(db, monkeypatch):
    monkeypatch.setenv("BENCH_MLFLOW_LOCK_WAIT_S", "30")
    tracker = Tracker(f"sqlite:///{db}", "lock")
    rid = tracker.start_run("a", {})
    holder = sqlite3.connect(str(db), timeout=0, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(2.0, holder.rollback).start()  # another writer, done within 2 s
    tracker.log_metrics(rid, {"m": 1.0})
    assert not tracker.offline
    assert tracker.client.get_run(rid).data.metrics["m"] == 1.0
    tracker.lock_wait_s = 1.0
    holder.execute("BEGIN EXCLUSIVE")  # held for good
    t0 = time.monotonic()
    tracker.log_metrics(rid, {"m": 2.0})
    holder.rollback()
    holder.close()
    assert "locked" in tracker.offline and time.monotonic() - t0 < 30
