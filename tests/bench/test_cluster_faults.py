"""Multi-node submission and fault tolerance on real local Ray clusters (slow: each starts its own Ray)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.support import tiny_argv

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_to_a_two_node_cluster_places_workers_on_both_nodes(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    # a job's entrypoint runs `python` from the cluster's environment: as on a real head node, that python must
    # be the one with the project's dependencies (here: this interpreter's, also when its venv is not activated)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    dash = _free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        storage, results = tmp_path / "runs", tmp_path / "results"
        cmd = [sys.executable, "-m", "bench", "submit", "--address", f"http://127.0.0.1:{dash}", "--",
               "run", "--methods", "dino", "--tasks", "linseg", "--workers", "2", "--run-id", "mn",
               "--storage", str(storage), "--tracking-uri", f"sqlite:///{tmp_path / 'mlruns.db'}",
               "--set", f"run.results_dir={results}", "--set", "pretrain.cpus_per_worker=1"] + tiny_argv()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "submitted job" in proc.stdout and "SUCCEEDED" in proc.stdout
        assert "Leaderboard" in proc.stdout and "random-init" in proc.stdout
        placed = [json.loads((storage / "mn" / "dino" / "workers" / f"rank_{r}.json").read_text()) for r in (0, 1)]
        assert {p["world"] for p in placed} == {2}
        assert placed[0]["node_id"] != placed[1]["node_id"]  # one worker per node
        assert (results / "mn.md").exists()
    finally:
        ray.shutdown()
        cluster.shutdown()  # only the processes this test started


def test_killed_training_worker_resumes_from_checkpoint(tmp_path, monkeypatch):
    from bench.config import load_config
    from bench.pipeline import Pipeline
    from bench.pretrain import read_metrics

    monkeypatch.chdir(tmp_path)
    sets = ["pretrain.epochs=1", "pretrain.steps_per_epoch=12", "pretrain.batch_size=8", "pretrain.log_every=1",
            "pretrain.checkpoint_every=3", "pretrain.max_failures=2", "data.synthetic.num_train=64",
            "data.synthetic.num_val=8", "tasks.linseg.epochs=1", "run.baseline=false",
            "pretrain.local_mode=never"]  # a worker group: its worker is the process killed
    cfg = load_config(None, sets, {"run": {"methods": ["dino"], "tasks": ["linseg"], "run_id": "kill"}})
    pipe = Pipeline(cfg, progress=False)
    out_dir = tmp_path / "bench_runs" / "kill" / "dino"
    killed = {}

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            rows = read_metrics(str(out_dir))
            if rows and rows[-1]["step"] >= 5:
                pid = json.loads((out_dir / "workers" / "rank_0.json").read_text())["pid"]
                os.kill(pid, signal.SIGKILL)
                killed["at"] = rows[-1]["step"]
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        rows = pipe.run()
    finally:
        import ray

        ray.shutdown()
    assert killed, "the worker was never killed"
    steps = [r["step"] for r in read_metrics(str(out_dir))]
    assert steps == list(range(1, 13))  # resumed, completed, no step logged twice
    assert (out_dir / "final.pt").exists()
    assert not list((out_dir / "checkpoints").glob(".tmp-*"))
    runs = pipe.tracker.find_runs("tags.`bench.run_id` = 'kill'")
    assert sorted(r.data.tags["bench.kind"] for r in runs) == ["eval", "pretrain", "run"]
    pre = [r for r in runs if r.data.tags["bench.kind"] == "pretrain"][0]
    assert pre.data.metrics["pretrain/steps"] == 12
    assert 0 < pre.data.metrics["pretrain/resumed_from"] <= killed["at"]
    assert len(rows) == 1


def test_interrupted_driver_rerun_skips_finished_stages(tmp_path):
    argv = [sys.executable, "-m", "bench", "run", "--methods", "dino", "--tasks", "linseg", "--run-id", "drv",
            "--no-progress"] + tiny_argv()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    final = tmp_path / "bench_runs" / "drv" / "dino" / "final.pt"
    deadline = time.time() + 600
    while time.time() < deadline and not final.exists() and proc.poll() is None:
        time.sleep(0.2)
    assert final.exists()
    proc.send_signal(signal.SIGINT)  # Ctrl-C once pretraining is done, during evaluation
    out, _ = proc.communicate(timeout=120)
    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "already finished" in again.stdout and "Leaderboard" in again.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("bench")
    runs = client.search_runs([exp.experiment_id])
    kinds = sorted(r.data.tags["bench.kind"] for r in runs)
    assert kinds == ["eval", "eval", "pretrain", "run"]  # nothing duplicated
    assert all(r.info.status == "FINISHED" for r in runs)


# ------------------------------------------------------------------------------ multi-node faults (bench.faults)
def _private_ray_tmp(monkeypatch) -> str:
    """A short private Ray temp root: the test cluster writes its address file (``ray_current_cluster``) there,
    not in /tmp/ray where every other Ray user of this machine would find it."""
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", root)
    import atexit

    atexit.register(shutil.rmtree, root, True)
    return root


def _steps(out_dir) -> list[int]:
    from bench.pretrain import read_metrics

    return [r["step"] for r in read_metrics(str(out_dir))]


def test_worker_node_removed_mid_pretraining_continues_on_the_remaining_nodes(tmp_path, monkeypatch):
    """Three one-CPU nodes, two Train workers; the node of rank 1 is removed after step 5. With
    pretrain.max_failures=2, Ray Train restarts the worker group on the two nodes left, the loop resumes from the
    last checkpoint, and the run ends at the same step count with no step logged twice."""
    import ray
    from ray.cluster_utils import Cluster

    from bench.config import load_config
    from bench.pipeline import Pipeline

    monkeypatch.chdir(tmp_path)
    _private_ray_tmp(monkeypatch)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR")
        sets = ["pretrain.epochs=1", "pretrain.steps_per_epoch=12", "pretrain.batch_size=8", "pretrain.log_every=1",
                "pretrain.checkpoint_every=3", "pretrain.max_failures=2", "pretrain.workers=2",
                "pretrain.cpus_per_worker=1", "data.synthetic.num_train=64", "data.synthetic.num_val=8",
                "tasks.linseg.epochs=1", "run.baseline=false"]
        cfg = load_config(None, sets, {"run": {"methods": ["dino"], "tasks": ["linseg"], "run_id": "node"}})
        pipe = Pipeline(cfg, progress=False)
        out_dir = tmp_path / "bench_runs" / "node" / "dino"
        removed = {}

        def remover():
            deadline = time.time() + 600
            while time.time() < deadline and not removed:
                steps = _steps(out_dir)
                rank1 = out_dir / "workers" / "rank_1.json"
                if steps and steps[-1] >= 5 and rank1.exists():
                    hosts = {json.loads((out_dir / "workers" / f"rank_{r}.json").read_text())["node_id"]
                             for r in (0, 1)}
                    for node in workers:  # a worker node (never the head) that hosts a Train worker
                        if node.node_id in hosts and not removed:
                            cluster.remove_node(node, allow_graceful=False)
                            removed["at"], removed["node"] = steps[-1], node.node_id
                    removed.setdefault("at", None)
                time.sleep(0.2)

        t = threading.Thread(target=remover, daemon=True)
        t.start()
        rows = pipe.run()
        assert removed.get("node"), f"no worker node hosted a Train worker: {removed}"
        assert _steps(out_dir) == list(range(1, 13))  # same final step count, nothing logged twice
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert removed["node"] not in alive and len(alive) == 2
        placed = [json.loads((out_dir / "workers" / f"rank_{r}.json").read_text())["node_id"] for r in (0, 1)]
        assert set(placed) <= alive  # the restarted workers run on the remaining nodes
        pre = [r for r in pipe.tracker.find_runs("tags.`bench.run_id` = 'node'") if r.data.tags["bench.kind"] == "pretrain"]
        assert len(pre) == 1 and pre[0].data.metrics["pretrain/steps"] == 12
        assert 0 < pre[0].data.metrics["pretrain/resumed_from"] <= removed["at"]
        assert len(rows) == 1
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_driver_sigkilled_and_rerun_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """On a two-node cluster: an uninterrupted ``bench run``, and the same command SIGKILLed mid-pretraining and
    run again. The rerun resumes from the checkpoint (the dead driver's run lock is recognised as stale), logs
    identical final metrics, and MLflow holds one run per stage."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray.cluster_utils import Cluster

    _private_ray_tmp(monkeypatch)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": REPO}
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        uri = f"sqlite:///{tmp_path / 'mlruns.db'}"

        def argv(run_id):
            return [sys.executable, "-m", "bench", "run", "--methods", "dino", "--tasks", "linseg", "--run-id", run_id,
                    "--no-progress", "--no-baseline", "--no-cache", "--address", cluster.address, "--tracking-uri",
                    uri, "--set", "pretrain.workers=2", "--set", "pretrain.cpus_per_worker=1"] + tiny_argv(
                "--set", "pretrain.steps_per_epoch=40", "--set", "pretrain.checkpoint_every=3")

        ref = subprocess.run(argv("ref"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]

        proc = subprocess.Popen(argv("drv"), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        out_dir = tmp_path / "bench_runs" / "drv" / "dino"
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if [s for s in _steps(out_dir) if s >= 4]:
                break
            time.sleep(0.2)
        at = _steps(out_dir)[-1:]
        proc.send_signal(signal.SIGKILL)
        t_kill = time.time()
        out, _ = proc.communicate(timeout=60)
        after = time.time() - t_kill
        assert not (out_dir / "final.pt").exists() and (tmp_path / "bench_runs" / "drv" / "run.lock").exists(), (
            at, _steps(out_dir)[-1:], after, out[-1500:])
        time.sleep(3.0)  # the cluster notices the dead driver and ends its Train workers

        again = subprocess.run(argv("drv"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert "taking it over" in again.stderr

        def metrics(run_id):
            return json.loads((tmp_path / "bench_runs" / run_id / "dino" / "eval_linseg.json").read_text())["metrics"]

        assert metrics("drv") == metrics("ref")  # identical final metrics
        assert _steps(out_dir) == list(range(1, 41))
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("bench").experiment_id
        runs = client.search_runs([exp], "tags.`bench.run_id` = 'drv'")
        assert sorted(r.data.tags["bench.kind"] for r in runs) == ["eval", "pretrain", "run"]  # one per stage
        assert all(r.info.status == "FINISHED" for r in runs)
        pre = [r for r in runs if r.data.tags["bench.kind"] == "pretrain"][0]
        ref_pre = [r for r in client.search_runs([exp], "tags.`bench.run_id` = 'ref'")
                   if r.data.tags["bench.kind"] == "pretrain"][0]
        assert pre.data.metrics["pretrain/final_loss"] == ref_pre.data.metrics["pretrain/final_loss"]
        assert pre.data.metrics["pretrain/resumed_from"] > 0
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_submit_stop_ends_the_job_and_what_it_started(tmp_path, monkeypatch):
    """``bench submit --stop`` returns once the job is STOPPED and its actors (Ray Train controller and workers)
    are dead: the cluster's CPUs are free again for the next job."""
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    _private_ray_tmp(monkeypatch)
    dash = _free_port()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash})
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    try:
        cluster.wait_for_nodes()
        address = f"http://127.0.0.1:{dash}"
        storage = tmp_path / "runs"
        cmd = [sys.executable, "-m", "bench", "submit", "--address", address, "--no-follow", "--",
               "run", "--methods", "dino", "--tasks", "linseg", "--run-id", "stop", "--storage", str(storage),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlruns.db'}", "--set", "pretrain.cpus_per_worker=1"] + \
            tiny_argv("--set", "pretrain.steps_per_epoch=500")
        sub = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert sub.returncode == 0, sub.stdout[-2000:] + sub.stderr[-2000:]
        job_id = sub.stdout.strip().splitlines()[-1]
        metrics = storage / "stop" / "dino" / "metrics.jsonl"
        deadline = time.time() + 600
        while time.time() < deadline and not metrics.exists():
            time.sleep(1.0)
        assert metrics.exists(), "the job never started pretraining"
        stop = subprocess.run([sys.executable, "-m", "bench", "submit", "--address", address, "--stop", job_id],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert stop.stdout.strip() == f"job {job_id} STOPPED; its actors have ended", stop.stdout
        ray.init(address=cluster.address, logging_level="ERROR")
        deadline = time.time() + 30
        while time.time() < deadline and ray.available_resources().get("CPU", 0) < 2:
            time.sleep(0.5)
        assert ray.available_resources().get("CPU", 0) == 2  # nothing of the job holds CPUs any more
    finally:
        ray.shutdown()
        cluster.shutdown()
