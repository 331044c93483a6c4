"""``bench tune``: resources, ASHA wiring and resume replay, the Optuna searcher and summary, the held-out proxy,
a tiny end-to-end search through Ray Tune + Ray Train + MLflow, resume after an interruption, and
``bench run --from-tune``."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.tune import (OBJECTIVE, PROXY, BenchASHA, BenchOptunaSearch, apply_from_tune, optuna_summary,
                        plan_resources)

# ------------------------------------------------------------------------------------------ resources


@pytest.mark.parametrize("args,expected", [
    # workers, cpus_per_worker, gpu, --concurrent, trials, cluster CPUs, GPUs -> (at once, CPUs per worker)
    ((1, 0, False, 0, 16, 2, 0), (1, 2)),  # default: one trial takes the machine, like `bench run`
    ((1, 0, False, 2, 16, 2, 0), (2, 1)),  # --concurrent 2 splits the CPUs
    ((2, 0, False, 0, 16, 16, 0), (1, 8)),
    ((1, 4, False, 0, 16, 16, 0), (4, 4)),  # fixed cpus_per_worker: as many trials as fit
    ((1, 0, True, 0, 16, 16, 4), (4, 4)),  # GPUs limit: 4 single-GPU trials with 4 CPUs each
    ((2, 0, True, 0, 16, 16, 4), (2, 4)),
    ((1, 1, False, 0, 3, 16, 0), (3, 1)),  # never more at once than there are trials
])
def test_plan_resources(args, expected):
    concurrent, cpw, notes = plan_resources(*args)
    assert (concurrent, cpw) == expected and notes == []


def test_plan_resources_clamps_and_rejects():
    concurrent, cpw, notes = plan_resources(1, 4, False, 8, 16, 8, 0)
    assert (concurrent, cpw) == (2, 4) and "the cluster holds 2 trial(s) at once" in notes[0]
    with pytest.raises(BenchError, match="a trial needs 1 GPU"):
        plan_resources(1, 0, True, 0, 4, 8, 0)
    with pytest.raises(BenchError, match="a trial needs 8 CPUs, the Ray cluster has 4"):
        plan_resources(2, 4, False, 0, 4, 4, 0)


# ------------------------------------------------------------------------------------------ ASHA


def _asha(tmp_path, history=None):
    path = tmp_path / "mlflow_trials.json"
    if history is not None:
        path.write_text(json.dumps(history))
    # total 6 steps, proxy every 2: rungs at 2 and 4, never at the last step (max_t = total - 1)
    return BenchASHA(str(path), time_attr="step", metric=PROXY, mode="max", max_t=5, grace_period=2,
                     reduction_factor=2, stop_last_trials=False)


def _feed(sched, tid, results):
    trial = types.SimpleNamespace(trial_id=tid)
    if tid not in sched._trial_info:
        sched.on_trial_add(None, trial)
    return [sched.on_trial_result(None, trial, r) for r in results]


def test_asha_stops_below_the_rung_median_and_never_at_the_end(tmp_path):
    sched = _asha(tmp_path)
    # first trial: nothing recorded yet, continues; its last-step result is never a stop, however low
    assert _feed(sched, "a", [{"step": 1, "loss": 3.0}, {"step": 2, PROXY: 10.0}, {"step": 4, PROXY: 10.0},
                              {"step": 6, PROXY: 0.0}, {"step": 6, OBJECTIVE: 5.0, PROXY: 0.0}]) == ["CONTINUE"] * 5
    assert _feed(sched, "b", [{"step": 2, PROXY: 5.0}]) == ["STOP"]  # 5 < cutoff 10
    # c passes rung 2 (12 >= median(10, 5) = 7.5) and is stopped at rung 4 (9 < 10)
    assert _feed(sched, "c", [{"step": 1, "loss": 1.0}, {"step": 2, PROXY: 12.0}, {"step": 4, PROXY: 9.0}]) == \
        ["CONTINUE", "CONTINUE", "STOP"]


def test_asha_resume_replays_finished_trials_only(tmp_path):
    history = {"a": {"done": True, "proxy": {"2": 10.0, "4": 10.0}},
               "x": {"done": False, "proxy": {"2": 100.0, "4": 100.0}}}  # interrupted: re-reports after resume
    sched = _asha(tmp_path, history)
    assert _feed(sched, "b", [{"step": 2, PROXY: 5.0}]) == ["STOP"]  # a's rung value survived the resume
    # rung 4 holds only a (10): 50 continues (with x's 100 replayed the cutoff would be 55)
    assert _feed(sched, "d", [{"step": 2, PROXY: 50.0}, {"step": 4, PROXY: 50.0}]) == ["CONTINUE", "CONTINUE"]
    (tmp_path / "fresh").mkdir()
    fresh = _asha(tmp_path / "fresh")
    assert _feed(fresh, "b", [{"step": 2, PROXY: 5.0}]) == ["CONTINUE"]  # nothing to replay: first at its rung


# ------------------------------------------------------------------------------------------ Optuna


def test_optuna_searcher_ignores_intermediate_results_and_is_seeded():
    from ray import tune

    space = {"dino.teacher_temp": tune.uniform(0.02, 0.07), "pretrain.lr": tune.loguniform(1e-4, 1e-2)}

    def make():
        s = BenchOptunaSearch(metric=OBJECTIVE, mode="max", seed=3)
        s.set_search_properties(None, None, space)
        return s

    s1, s2 = make(), make()
    c1, c2 = s1.suggest("t1"), s2.suggest("t1")
    assert c1 == c2 and 0.02 <= c1["dino.teacher_temp"] <= 0.07
    s1.on_trial_result("t1", {"step": 2, PROXY: 3.0, "training_iteration": 1})  # no objective yet: ignored
    s1.on_trial_result("t1", {"step": 6, OBJECTIVE: 7.5, "training_iteration": 2})
    s1.on_trial_complete("t1", {"step": 6, OBJECTIVE: 7.5})
    s1.suggest("t2")
    s1.on_trial_complete("t2", {"step": 2, PROXY: 1.0})  # stopped by ASHA: no objective -> pruned
    states = [t.state.name for t in s1._ot_study.trials]
    assert states == ["COMPLETE", "PRUNED"] and s1._ot_study.trials[0].value == 7.5


def test_optuna_summary_importances_and_plots():
    from ray import tune

    domains = {"a.x": tune.uniform(0, 1), "a.y": tune.uniform(0, 1)}
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):  # the objective depends on x only
        x, y = float(rng.random()), float(rng.random())
        rows.append({"a.x": x, "a.y": y, "status": "completed", OBJECTIVE: 10 * x})
    rows.append({"a.x": 0.5, "a.y": 0.5, "status": "early_stopped", OBJECTIVE: None})
    out = optuna_summary(domains, rows, "max")
    imp = out["param_importances.json"]
    assert set(imp) == {"a.x", "a.y"} and abs(sum(imp.values()) - 1) < 1e-6 and imp["a.x"] > 0.8
    for name in ("optimization_history.png", "param_importances.png"):
        assert out[name][:8] == b"\x89PNG\r\n\x1a\n"
    few = optuna_summary(domains, rows[:1], "max")
    assert "optimization_history.png" in few and "param_importances.json" not in few
    assert "need at least 2 completed trials (1 completed)" in few["notes.txt"]


# ------------------------------------------------------------------------------------------ proxy


def test_knn_predict_by_hand():
    from bench.proxy import knn_predict

    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # k=2, weights exp(cos/0.07): query 0 sees support 0 (cos 1, class 0) and 2 (cos 0.6, class 1) -> class 0
    assert knn_predict(support, labels, query, 2, k=2).tolist() == [0, 1]
    # k=3, temperature 1: query 0 votes e^1 for class 0 and e^0 + e^0.6 = 2.82 for class 1 -> class 1
    assert knn_predict(support, labels, query, 2, k=3, temperature=1.0).tolist() == [1, 1]


def test_proxy_scores_on_separable_and_uninformative_features():
    from bench.proxy import kmeans_miou, knn_miou

    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 3, (8, 4, 4), generator=g)
    masks = masks.repeat_interleave(4, 1).repeat_interleave(4, 2)  # 8×16×16, constant per 4×4 token
    masks[0, :4, :4] = 255  # an ignored token
    tok = masks[:, ::4, ::4].clone()
    tok[tok == 255] = 0
    feats = torch.nn.functional.one_hot(tok, 3).permute(0, 3, 1, 2).float()  # 8×3×4×4: the class itself
    assert knn_miou(feats, masks, 3) == pytest.approx(100.0)
    assert kmeans_miou(feats, masks, 3) == pytest.approx(100.0)
    const = torch.ones(8, 3, 4, 4)  # every token alike: one predicted class, IoU of the others 0
    assert knn_miou(const, masks, 3) < 40.0


def test_proxy_leaves_training_state_alone():
    from bench.config import PretrainConfig
    from bench.proxy import Proxy

    loop = {"dataset": "synthetic", "dataset_cfg": {"num_train": 4, "num_val": 6}}
    proxy = Proxy.from_loop_config(loop, PretrainConfig(proxy_every=1, proxy_images=32))
    assert proxy.images.shape == (6, 3, 96, 96) and proxy.masks.shape == (6, 96, 96)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
            self.drop = torch.nn.Dropout(0.5)

        def dense_features(self, x):
            assert not self.training  # evaluation mode while scoring
            return self.drop(self.conv(x))

    model = Tiny().train()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = proxy.score(model, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before) and model.training
    assert proxy.score(model, torch.device("cpu")) == first and 0.0 <= first <= 100.0
    out = proxy.metrics(model, torch.device("cpu"))
    assert out[PROXY] == first and out["proxy_s"] >= 0.0


# ------------------------------------------------------------------------------------------ --from-tune


def _best(storage, name, method="dino", values=None, pretrain=None):
    values = values or {"dino.teacher_temp": 0.061}
    over = {"methods": {method: {k.split(".", 1)[1]: v for k, v in values.items()}}}
    if pretrain:
        over["pretrain"] = pretrain
        values = {**values, **{f"pretrain.{k}": v for k, v in pretrain.items()}}
    d = storage / "tune" / name
    d.mkdir(parents=True)
    (d / "best.json").write_text(json.dumps({"name": name, "method": method, "task": "linseg",
                                             "metric": "linseg/miou", OBJECTIVE: 42.0, "values": values,
                                             "fixed": {}, "overrides": over, "complete": True}))


def test_from_tune_applies_the_best_values(tmp_path, monkeypatch):
    from bench.config import load_config

    monkeypatch.chdir(tmp_path)
    _best(tmp_path / "bench_runs", "s", pretrain={"lr": 2e-4})
    cfg = apply_from_tune(load_config(None, []), ["s"])
    assert cfg.run.methods == ["dino"] and cfg.methods["dino"].teacher_temp == 0.061
    assert cfg.pretrain_for("dino").lr == 2e-4
    # an explicit --set still wins over the tuned value
    cfg = apply_from_tune(load_config(None, ["methods.dino.teacher_temp=0.05"]), ["s"])
    assert cfg.methods["dino"].teacher_temp == 0.05
    with pytest.raises(BenchError, match="that search tuned 'dino', which --methods croc does not name"):
        apply_from_tune(load_config(None, [], {"run": {"methods": ["croc"]}}), ["s"])
    with pytest.raises(BenchError, match=r"sets pretrain.\* \(lr\), which would apply to every method"):
        apply_from_tune(load_config(None, [], {"run": {"methods": ["dino", "croc"]}}), ["s"])


# ------------------------------------------------------------------------------------------ end to end

TINY = ["--set", "methods.dino.out_dim=64", "--set", "methods.dino.hidden_dim=32", "--set",
        "methods.dino.bottleneck_dim=16", "--set", "methods.dino.n_local=1", "--set", "pretrain.epochs=1",
        "--set", "pretrain.steps_per_epoch=4", "--set", "pretrain.batch_size=8", "--set", "pretrain.log_every=1",
        "--set", "pretrain.proxy_every=1", "--set", "pretrain.proxy_images=16", "--set", "data.synthetic.num_train=32",
        "--set", "data.synthetic.num_val=16", "--set", "tasks.linseg.epochs=1", "--set", "tasks.linseg.drop_at=1"]
SPACE = ["--space-only", "--space", "dino.momentum_teacher=uniform(0.0, 0.5)",
         "--space", "pretrain.lr=loguniform(1e-4, 1e-2)"]


@pytest.fixture(scope="module")
def ray_session():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def search(tmp_path_factory, ray_session):
    """One tiny search (4 trials of 4 steps, proxy every step) shared by the end-to-end checks."""
    from bench.cli import main

    root = tmp_path_factory.mktemp("tune")
    old = os.getcwd()
    os.chdir(root)
    try:
        code = main(["tune", "--method", "dino", "--trials", "4", "--name", "tiny"] + SPACE + TINY)
    finally:
        os.chdir(old)
    assert code == 0
    return root


def _client(root):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    return client, client.get_experiment_by_name("bench")


def _asha_decisions(rows, history, rungs=(1, 2)):
    """ASHA's rule replayed independently, in trial order: stopped at the first rung whose proxy is below the
    median of the earlier trials' values at that rung."""
    recorded = {r: [] for r in rungs}
    stopped = {}
    for row in rows:
        proxies = {int(s): v for s, v in history[row["trial_id"]]["proxy"].items()}
        for rung in rungs:
            if rung not in proxies:
                break
            value = proxies[rung]
            if recorded[rung] and value < np.percentile(recorded[rung], 50):
                stopped[row["trial_id"]] = rung
                recorded[rung].append(value)
                break
            recorded[rung].append(value)
    return stopped


@pytest.mark.slow
def test_tiny_search_completes_with_early_stops_and_logs_everything(search):
    d = search / "bench_runs" / "tune" / "tiny"
    best = json.loads((d / "best.json").read_text())
    history = json.loads((d / "mlflow_trials.json").read_text())
    import pandas as pd

    table = pd.read_csv(d / "trials.csv")
    rows = table.to_dict("records")
    assert len(rows) == 4 and set(table["status"]) <= {"completed", "early_stopped"}
    assert list(table["trial"]) == sorted(table["trial"])
    # ASHA: at least one trial stopped early, exactly the ones its rule picks from the logged proxies
    stopped = {r["trial_id"]: int(r["step"]) for r in rows if r["status"] == "early_stopped"}
    assert len(stopped) >= 1
    assert stopped == _asha_decisions(rows, history)
    # a stopped trial never reached the end; a completed one has its objective and ran every step
    for r in rows:
        if r["status"] == "completed":
            assert r["step"] == 4 and 0.0 <= r[OBJECTIVE] <= 100.0
            assert sorted(int(s) for s in history[r["trial_id"]]["proxy"]) == [1, 2, 3, 4]
        else:
            assert np.isnan(r[OBJECTIVE]) and not (d / "trials" / r["trial_id"] / "final.pt").exists()
    done = [r for r in rows if r["status"] == "completed"]
    top = max(done, key=lambda r: r[OBJECTIVE])
    assert best["trial_id"] == top["trial_id"] and best[OBJECTIVE] == pytest.approx(top[OBJECTIVE])
    assert best["values"]["pretrain.lr"] == pytest.approx(top["pretrain.lr"])
    assert 1e-4 <= best["values"]["pretrain.lr"] <= 1e-2 and 0 <= best["values"]["dino.momentum_teacher"] <= 0.5
    # every trial started exactly once
    for r in rows:
        assert len((d / "trials" / r["trial_id"] / "attempts.jsonl").read_text().splitlines()) == 1

    client, exp = _client(search)
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("bench.kind") == "tune"]
    trials = [r for r in runs if r.data.tags.get("bench.kind") == "trial"]
    assert len(parent) == 1 and len(trials) == 4
    parent = parent[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["tune.state"] == "finished"
    for run in trials:
        row = next(r for r in rows if r["trial_id"] == run.data.tags["trial_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert run.data.tags["tune.status"] == row["status"]
        assert float(run.data.params["pretrain.lr"]) == pytest.approx(row["pretrain.lr"])
        curve = client.get_metric_history(run.info.run_id, "train/proxy")
        assert [m.step for m in curve] == list(range(1, int(row["step"]) + 1))
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [m.step for m in curve]
        if row["status"] == "completed":
            assert run.data.metrics[OBJECTIVE] == pytest.approx(row[OBJECTIVE])
            assert run.data.metrics["linseg/miou"] == pytest.approx(row[OBJECTIVE])
        else:
            assert OBJECTIVE not in run.data.metrics
    assert parent.data.metrics[f"best/{OBJECTIVE}"] == pytest.approx(best[OBJECTIVE])
    assert parent.data.metrics["tune/early_stopped"] == len(stopped)
    assert parent.data.tags["best.pretrain.lr"] == str(best["values"]["pretrain.lr"])
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/best_config.json", "tune/trials.json", "tune/trials.csv", "tune/optimization_history.png"} <= arts
    logged = client.load_table(exp.experiment_id, "tune/trials.json", run_ids=[parent.info.run_id])
    assert sorted(logged["trial_id"]) == sorted(table["trial_id"])


@pytest.mark.slow
def test_run_from_tune_pretrains_with_the_best_config(search, monkeypatch, capsys):
    from bench.cli import main
    from tests.support import tiny_argv

    monkeypatch.chdir(search)
    best = json.loads((search / "bench_runs" / "tune" / "tiny" / "best.json").read_text())
    assert main(["run", "--from-tune", "tiny", "--run-id", "ft", "--no-progress", "--no-baseline"] + tiny_argv()) == 0
    assert "from tune tiny" in capsys.readouterr().out
    client, exp = _client(search)
    pre = [r for r in client.search_runs([exp.experiment_id], "tags.`bench.kind` = 'pretrain'")
           if r.data.tags.get("bench.run_id") == "ft"]
    assert len(pre) == 1
    params = pre[0].data.params
    assert float(params["method.momentum_teacher"]) == pytest.approx(best["values"]["dino.momentum_teacher"])
    assert float(params["pretrain.lr"]) == pytest.approx(best["values"]["pretrain.lr"])


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(tmp_path, ray_session):
    """A search interrupted (SIGINT, as Ctrl-C) after its first trials finished; ``--resume`` keeps them."""
    import ray

    ray.shutdown()  # the resumed search starts its own Ray in this process
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=os.getcwd())
    argv = [sys.executable, "-m", "bench", "tune", "--method", "dino", "--trials", "3", "--name", "cut", "--no-asha"]
    proc = subprocess.Popen(argv + SPACE + TINY, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    d = tmp_path / "bench_runs" / "tune" / "cut"
    deadline = time.time() + 900
    try:
        while time.time() < deadline:  # wait until one trial is done and the next has started
            hist = json.loads((d / "mlflow_trials.json").read_text()) if (d / "mlflow_trials.json").exists() else {}
            if sum(h.get("done", False) for h in hist.values()) >= 1 and len(hist) >= 2:
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=300)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "continue it with: python -m bench tune --resume cut" in out
    before = json.loads((d / "mlflow_trials.json").read_text())
    finished = {t for t, h in before.items() if h.get("done")}
    assert 1 <= len(finished) < 3

    from bench.cli import main

    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["tune", "--resume", "cut"]) == 0
    finally:
        os.chdir(old)
    after = json.loads((d / "mlflow_trials.json").read_text())
    assert len(after) == 3 and all(h.get("done") for h in after.values())
    for tid in finished:  # a finished trial is never started again, and keeps its MLflow run
        assert len((d / "trials" / tid / "attempts.jsonl").read_text().splitlines()) == 1
        assert after[tid]["run"] == before[tid]["run"]
    client, exp = _client(tmp_path)
    trials = client.search_runs([exp.experiment_id], "tags.`bench.kind` = 'trial'")
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
    parent = client.search_runs([exp.experiment_id], "tags.`bench.kind` = 'tune'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert (d / "best.json").exists()


@pytest.mark.slow
def test_proxy_hook_reports_without_changing_training(tmp_path):
    """``pretrain.proxy_every`` adds the proxy to the loop's metrics; the trained weights are identical."""
    from bench import checkpoint as ckpt
    from bench.pretrain import read_metrics, train_loop

    def loop(out, **extra):
        return {"method": "dino", "method_cfg": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "n_local": 1},
                "pretrain": {"epochs": 1, "steps_per_epoch": 4, "batch_size": 8, "log_every": 3, **extra},
                "backbone": {}, "dataset": "synthetic", "dataset_cfg": {"num_train": 32, "num_val": 8}, "seed": 1,
                "out_dir": str(out)}

    train_loop(loop(tmp_path / "off"))
    train_loop(loop(tmp_path / "on", proxy_every=2))
    off, on = read_metrics(str(tmp_path / "off")), read_metrics(str(tmp_path / "on"))
    assert [r["step"] for r in off] == [3, 4] and all(PROXY not in r for r in off)
    assert [r["step"] for r in on] == [2, 3, 4] and [PROXY in r for r in on] == [True, False, True]
    assert all(0.0 <= r[PROXY] <= 100.0 for r in on if PROXY in r)
    a = ckpt.load_torch(str(tmp_path / "off" / "final.pt"))["method_state"]
    b = ckpt.load_torch(str(tmp_path / "on" / "final.pt"))["method_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
