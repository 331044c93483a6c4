"""End to end, through Ray Train on a very small config: ``--seeds 2`` prints mean ± std; a second run with a
new run id reuses both pretrainings and every evaluation; two runs at once into one sqlite store both log all
their runs; a run on other evaluation data gives a second table; ``bench reproduce`` re-runs one cell."""

import os
import re
import subprocess
import sys
import time

import pytest

from bench.cli import main
from tests.support import tiny_argv

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _runs(tmp, **filters):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlruns.db'}")
    exp = client.get_experiment_by_name("bench")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if all(r.data.tags.get(k) == v for k, v in filters.items())]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeds")
    cwd = os.getcwd()
    os.chdir(tmp)
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    t = time.perf_counter()
    try:
        with redirect_stdout(buf):
            rc = main(["run", "--methods", "dino", "--tasks", "linseg", "--seeds", "2", "--run-id", "s1",
                       "--no-progress"] + tiny_argv())
    finally:
        os.chdir(cwd)
    yield {"tmp": tmp, "rc": rc, "out": buf.getvalue(), "wall": time.perf_counter() - t}
    import ray

    ray.shutdown()


def test_two_seeds_print_mean_pm_std_and_log_one_run_per_cell(first):
    assert first["rc"] == 0, first["out"]
    out, tmp = first["out"], first["tmp"]
    assert re.search(r"\| dino \| (cpu \| )?(\*\*)?[\d.]+ ± [\d.]+ \(2\)", out), out
    assert re.search(r"\| random-init \| (cpu \| )?(\*\*)?[\d.]+ ± [\d.]+ \(2\)", out), out
    assert (tmp / "bench_runs" / "s1" / "dino" / "seed0" / "final.pt").exists()
    assert (tmp / "bench_runs" / "s1" / "dino" / "seed1" / "eval_linseg_per_image.npz").exists()
    runs = _runs(tmp, **{"bench.run_id": "s1"})
    assert sorted(r.data.tags["bench.kind"] for r in runs) == ["eval"] * 4 + ["pretrain"] * 2 + ["run"]
    evals = [r for r in runs if r.data.tags["bench.kind"] == "eval"]
    assert sorted((r.data.tags["method"], r.data.tags["bench.seed"]) for r in evals) == [
        ("dino", "0"), ("dino", "1"), ("random-init", "0"), ("random-init", "1")]
    assert all(r.data.tags["bench.protocol_hash"] and r.data.tags["bench.data_hash"] for r in evals)
    dino = sorted((r for r in evals if r.data.tags["method"] == "dino"), key=lambda r: r.data.tags["bench.seed"])
    assert dino[0].data.metrics["linseg/miou"] != dino[1].data.metrics["linseg/miou"]  # the seeds differ
    parent = [r for r in runs if r.data.tags["bench.kind"] == "run"][0]
    from mlflow.tracking import MlflowClient

    arts = {a.path for a in MlflowClient(f"sqlite:///{tmp / 'mlruns.db'}").list_artifacts(parent.info.run_id)}
    assert {"leaderboard.json", "leaderboard.md", "leaderboard.png"} <= arts
    assert parent.data.metrics["dino/linseg/n"] == 2.0 and "dino/linseg/miou_std" in parent.data.metrics


def test_second_run_reuses_both_pretrainings_and_every_evaluation(first, capsys, monkeypatch):
    monkeypatch.chdir(first["tmp"])
    t = time.perf_counter()
    assert main(["run", "--methods", "dino", "--tasks", "linseg", "--seeds", "2", "--run-id", "s2",
                 "--no-progress"] + tiny_argv()) == 0
    wall = time.perf_counter() - t
    out = capsys.readouterr().out
    assert "reused from earlier runs: 2 pretraining(s), 4 evaluation(s)" in " ".join(out.split())
    assert "pretrained" not in out
    first_cells = re.findall(r"\| (dino|random-init) \| ([^|]+) \|", first["out"])
    assert re.findall(r"\| (dino|random-init) \| ([^|]+) \|", out) == first_cells  # the same cells
    assert wall < first["wall"] / 2, (wall, first["wall"])
    evals = _runs(first["tmp"], **{"bench.run_id": "s2", "bench.kind": "eval"})
    assert len(evals) == 4 and all(r.data.tags["bench.cache"] == "hit" for r in evals)
    # --no-cache recomputes (the evaluation only, to stay short: pretrainings come from run s1's folder)
    ledger = first["tmp"] / "bench_runs" / "s2"
    assert (ledger / "dino" / "seed1" / "cached_from.json").exists()


def test_two_runs_at_once_into_one_sqlite_store_both_log_everything(first):
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_AUTH_MODE="disabled")
    procs = [subprocess.Popen([sys.executable, "-m", "bench", "run", "--methods", "dino", "--tasks", "linseg",
                               "--seeds", "2", "--run-id", rid, "--no-progress"] + tiny_argv(),
                              cwd=first["tmp"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rid in ("c1", "c2")]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "not logged to MLflow" not in out
    for rid in ("c1", "c2"):
        runs = _runs(first["tmp"], **{"bench.run_id": rid})
        assert len(runs) == 7 and all(r.info.status == "FINISHED" for r in runs), rid


def test_other_evaluation_data_is_a_second_table(first, capsys, monkeypatch):
    monkeypatch.chdir(first["tmp"])
    assert main(["run", "--methods", "dino", "--tasks", "linseg", "--run-id", "d2", "--no-progress",
                 "--no-baseline"] + tiny_argv("--set", "data.synthetic.num_val=8")) == 0
    capsys.readouterr()
    assert main(["leaderboard"]) == 0
    out = capsys.readouterr().out
    assert out.count("| method |") == 2  # one table per evaluation data settings, never mixed
    assert re.search(r"\| dino \| (cpu \| )?(\*\*)?[\d.]+ ± [\d.]+ \(2\)", out) and re.search(r"\| dino \| (cpu \| )?(\*\*)?[\d.]+(\*\*)? \|", out)


def test_reproduce_one_cell(first, capsys, monkeypatch):
    monkeypatch.chdir(first["tmp"])
    cell = [r for r in _runs(first["tmp"], **{"bench.run_id": "s1", "bench.kind": "eval", "method": "dino"})
            if r.data.tags["bench.seed"] == "1"][0]
    assert main(["reproduce", cell.info.run_id, "--no-progress"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"recorded ([\d.]+), reproduced ([\d.]+), difference ([-+][\d.]+)", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(cell.data.metrics["linseg/miou"], abs=0.005)
    assert abs(float(m.group(3))) < 0.01  # CPU pretraining and probe are deterministic
    assert "pretrained 3 steps" in out  # recomputed, not taken from the cache
