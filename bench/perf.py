"""``bench perf``: benchmarks of the hot paths, each a ratio measured within one process run.

Absolute times on a shared machine are noisy; ratios of two paths timed back to back are not. Every
benchmark records what it compared, both figures and their ratio; the environment (versions, threads,
device) heads the report. Results go to ``results/perf.json`` and ``results/perf.md`` (atomic writes).

    sinkhorn   methods/common/sinkhorn.py vs POT ``ot.sinkhorn`` at the methods' sizes, same iterations
    kmeans     tasks/cluster.py k-means vs scikit-learn KMeans on the same features (time, inertia)
    ray        the pretraining loop through TorchTrainer (1 worker) vs called directly, per method
    data       view-pipeline images/s vs training-step images/s, per method
    headline   ``bench run --methods vice,clove,croc --tasks linseg`` wall time split by phase
    tune       one ``bench tune`` trial's wall time vs the same pretraining + evaluation called directly
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time

import numpy as np
import torch

from bench import checkpoint as ckpt
from bench.errors import BenchError

ALL = ["sinkhorn", "kmeans", "ray", "data", "headline", "tune"]


def environment() -> dict:
    import ray
    import timm

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return {"torch": torch.__version__, "ray": ray.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "device": dev, "machine": platform.machine()}


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


# ----------------------------------------------------------------------------------------------- sinkhorn

def bench_sinkhorn(tiny: bool = False) -> list[dict]:
    import ot

    from methods.common.sinkhorn import sinkhorn_plan, swav_sinkhorn

    rows = []
    rep = 2 if tiny else 10
    g = torch.Generator().manual_seed(0)
    # ViCE / Leopart: regions or tokens of a batch × prototypes, epsilon 0.05, 3 iterations
    for b, k in ([(256, 32)] if tiny else [(4096, 128), (16384, 128)]):
        s = torch.nn.functional.normalize(torch.randn(b, 16, generator=g), dim=1) @ \
            torch.nn.functional.normalize(torch.randn(k, 16, generator=g), dim=1).t()
        ours = lambda: swav_sinkhorn(s, 0.05, 3)  # noqa: E731
        m = (-s).double().numpy()
        a, bb = np.full(b, 1.0 / b), np.full(k, 1.0 / k)
        # POT iterates u then v: 3 of its iterations are the same 3 row/column scalings
        pot = lambda: ot.sinkhorn(a, bb, m, 0.05, numItermax=3, stopThr=0.0, warn=False)  # noqa: E731
        q, p = ours().double(), pot()
        err_ours = float(np.abs(q.sum(0).numpy() / b - 1.0 / k).sum())
        err_pot = float(np.abs(p.sum(0) - bb).sum() + np.abs(p.sum(1) - a).sum())
        t_ours, t_pot = _timeit(ours, rep), _timeit(pot, rep)
        rows.append({"case": f"swav B={b} K={k} it=3", "ours_s": t_ours, "pot_s": t_pot, "speedup": t_pot / t_ours,
                     "ours_marginal_err": err_ours, "pot_marginal_err": err_pot})
    # CrOC: (images × heads) problems of 2N joint tokens × K clusters, lambda 20, 5 iterations
    for pn, n, k in ([(4, 128, 5)] if tiny else [(24, 128, 5), (96, 392, 5)]):
        cost = torch.rand(pn, n, k, generator=g)
        a = torch.softmax(torch.randn(pn, n, generator=g), 1)
        bk = torch.softmax(torch.randn(pn, k, generator=g), 1)
        ours = lambda: sinkhorn_plan(cost, a, bk, 20.0, 5)  # noqa: E731
        cn, an, bn = cost.double().numpy(), a.double().numpy(), bk.double().numpy()
        pot = lambda: [ot.sinkhorn(an[i], bn[i], cn[i], 1.0 / 20.0, numItermax=5, stopThr=0.0, warn=False)  # noqa: E731
                       for i in range(pn)]
        pl, pp = ours().double().numpy(), np.stack(pot())
        # both marginals: ours ends on the column scaling, POT on the row scaling
        err_ours = float((np.abs(pl.sum(1) - bn).sum() + np.abs(pl.sum(2) - an).sum()) / pn)
        err_pot = float((np.abs(pp.sum(1) - bn).sum() + np.abs(pp.sum(2) - an).sum()) / pn)
        t_ours, t_pot = _timeit(ours, rep), _timeit(pot, rep)
        rows.append({"case": f"croc P={pn} N={n} K={k} it=5", "ours_s": t_ours, "pot_s": t_pot,
                     "speedup": t_pot / t_ours, "ours_marginal_err": err_ours, "pot_marginal_err": err_pot})
    return rows


# ------------------------------------------------------------------------------------------------- kmeans

def bench_kmeans(tiny: bool = False, seeds: int = 10) -> list[dict]:
    """k-means++ + Lloyd from one seeding per run (n_init=1 on both sides); one seeding's inertia is a draw, so
    each case is run with several seeds and the means are compared."""
    from sklearn.cluster import KMeans

    from tasks.cluster import kmeans

    rows = []
    g = torch.Generator().manual_seed(0)
    seeds = 2 if tiny else seeds
    for n, d, k in ([(2000, 32, 10)] if tiny else [(20000, 192, 10), (50000, 192, 27)]):
        centres = torch.randn(k * 3, d, generator=g) * 3
        x = centres[torch.randint(0, k * 3, (n,), generator=g)] + torch.randn(n, d, generator=g)
        # each side runs all its seeds in one block after one untimed warm-up: interleaving the two made each pay
        # for the other's OpenMP threads still spinning on 2 cores (ours measured 0.10 s interleaved, 0.06 s alone)
        def ours(seed: int) -> float:
            return kmeans(x, k, iters=100, seed=seed)[1]

        def sk(seed: int) -> float:
            return float(KMeans(n_clusters=k, n_init=1, max_iter=100, tol=1e-4, random_state=seed)
                         .fit(x.numpy()).inertia_)

        ours(seeds)
        t = time.perf_counter()
        in_ours = [ours(seed) for seed in range(seeds)]
        t_ours = time.perf_counter() - t
        sk(seeds)
        t = time.perf_counter()
        in_sk = [sk(seed) for seed in range(seeds)]
        t_sk = time.perf_counter() - t
        rows.append({"case": f"N={n} D={d} K={k}", "seeds": seeds, "ours_s": t_ours / seeds,
                     "sklearn_s": t_sk / seeds, "speedup": t_sk / t_ours, "ours_inertia": float(np.mean(in_ours)),
                     "sklearn_inertia": float(np.mean(in_sk)),
                     "inertia_ratio": float(np.mean(in_ours)) / float(np.mean(in_sk))})
    return rows


# ----------------------------------------------------------------------------------------- ray overhead

LOG_EVERY = 5  # steps per throughput window


def _steady_images_per_s(out_dir: str, batch: int) -> float:
    """Images/s over the logged windows after the first (a fresh process's first steps pay one-off costs:
    allocator growth, lazy initialisation; those are start-up, not per-step overhead)."""
    from bench.pretrain import read_metrics

    rows = [r for r in read_metrics(out_dir) if r["step"] > LOG_EVERY and r["step"] % LOG_EVERY == 0]
    if not rows:
        return float("nan")
    seconds = sum(LOG_EVERY * batch / r["images_per_s"] for r in rows)
    return len(rows) * LOG_EVERY * batch / seconds


def _short_run(steps: int, batch: int, log_every: int) -> list[str]:
    """``--set`` overrides for a pretraining of exactly ``steps`` steps with no intermediate checkpoint."""
    return ["pretrain.epochs=1", f"pretrain.steps_per_epoch={steps}", f"pretrain.batch_size={batch}",
            "pretrain.checkpoint_every=100000", f"pretrain.log_every={log_every}"]


def _loop_cfg(method: str, steps: int, out_dir: str, batch: int) -> dict:
    from bench.config import load_config, to_dict

    cfg = load_config(None, _short_run(steps, batch, LOG_EVERY), {"run": {"methods": [method]}})
    return {"method": method, "method_cfg": to_dict(cfg.methods[method]), "pretrain": to_dict(cfg.pretrain_for(method)),
            "backbone": to_dict(cfg.backbone), "dataset": "synthetic", "dataset_cfg": to_dict(cfg.data["synthetic"]),
            "seed": 0, "out_dir": out_dir}


def bench_ray(methods: list[str], steps: int, batch: int) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bench.pretrain import train_loop
    from bench.raycluster import init_ray

    init_ray()
    rows = []
    threads = torch.get_num_threads()
    for method in methods:
        tmp = tempfile.mkdtemp(prefix="bench-perf-")
        try:
            t = time.perf_counter()
            direct = train_loop(_loop_cfg(method, steps, os.path.join(tmp, "direct"), batch))
            wall_direct = time.perf_counter() - t
            direct_steady = _steady_images_per_s(os.path.join(tmp, "direct"), batch)
            cfg = _loop_cfg(method, steps, os.path.join(tmp, "ray"), batch)
            cfg["pretrain"]["cpus_per_worker"] = threads
            trainer = TorchTrainer(train_loop, train_loop_config=cfg,
                                   scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
                                   run_config=RunConfig(storage_path=os.path.join(tmp, "ray_storage")))
            t = time.perf_counter()
            res = trainer.fit().return_value
            wall_ray = time.perf_counter() - t
            ray_steady = _steady_images_per_s(os.path.join(tmp, "ray"), batch)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append({"method": method, "steps": steps, "direct_images_per_s": direct_steady,
                     "ray_images_per_s": ray_steady, "ratio": ray_steady / direct_steady,
                     "direct_all_steps_images_per_s": direct["images_per_s"],
                     "ray_all_steps_images_per_s": res["images_per_s"],
                     "direct_wall_s": wall_direct, "ray_wall_s": wall_ray})
    return rows


# ------------------------------------------------------------------------------------------ data pipeline

def bench_data(methods: list[str], n_images: int, batch: int) -> list[dict]:
    from bench.config import load_config
    from bench.data.synthetic import SyntheticConfig, SyntheticScenes
    from bench.data.views import PretrainViews, build_view_transform, collate_views
    from bench.optim import build_optimizer
    from bench.pretrain import build_method, plan_schedule

    rows = []
    data = SyntheticScenes(SyntheticConfig(num_train=max(n_images, batch)), "train")
    for method in methods:
        cfg = load_config(None, [], {"run": {"methods": [method]}})
        pcfg = cfg.pretrain_for(method)
        torch.manual_seed(0)
        m = build_method(method, vars(cfg.methods[method]), cfg.backbone, plan_schedule(pcfg, 1536, 1))
        views = PretrainViews(data, build_view_transform(m.view_spec()))
        t = time.perf_counter()
        samples = [views[i] for i in range(n_images)]
        data_ips = n_images / (time.perf_counter() - t)
        b = collate_views(samples[:batch])
        opt = build_optimizer(m.param_groups(), pcfg)
        m.train()

        def step(i=[0]):
            out = m(b, i[0])
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            m.after_step(i[0])
            i[0] += 1

        step_ips = batch / _timeit(step, 3)
        rows.append({"method": method, "data_images_per_s": data_ips, "step_images_per_s": step_ips,
                     "data_over_step": data_ips / step_ips,
                     "bottleneck": "data" if data_ips < step_ips else "model"})
    return rows


# ---------------------------------------------------------------------------------------------- headline

def bench_headline(methods: list[str], sets: list[str]) -> dict:
    from bench.config import load_config
    from bench.pipeline import Pipeline

    run_id = f"perf-{int(time.time())}"
    cfg = load_config(None, sets, {"run": {"methods": methods, "tasks": ["linseg"], "run_id": run_id, "cache": False,
                                           "results_dir": tempfile.mkdtemp(prefix="bench-perf-results-")}})
    pipe = Pipeline(cfg, progress=False)
    t = time.perf_counter()
    pipe.run()
    wall = time.perf_counter() - t
    return {"methods": methods, "wall_s": wall, "phases_s": dict(pipe.timings.phases)}


# -------------------------------------------------------------------------------------------------- tune

def bench_tune(methods: list[str], steps: int, batch: int, tiny: bool = False) -> list[dict]:
    """Tune's cost per trial: the first trial of a 1-trial search runs the method's configured values, so it
    does exactly the work of ``train_loop`` + ``evaluate_method`` called in this process on the same config."""
    import io

    from rich.console import Console

    from bench.config import load_config
    from bench.data import build_dataset
    from bench.evaluate import evaluate_method
    from bench.pipeline import eval_spec, loop_config
    from bench.pretrain import train_loop
    from bench.raycluster import init_ray
    from bench.tune import TuneOptions, new_search

    init_ray()
    rows = []
    threads = torch.get_num_threads()
    for method in methods:
        tmp = tempfile.mkdtemp(prefix="bench-perf-tune-")
        try:
            sets = _short_run(steps, batch, log_every=1000000)
            if tiny:
                sets += ["data.synthetic.num_train=32", "data.synthetic.num_val=8", "tasks.linseg.epochs=1"]
            cfg = load_config(None, sets, {"run": {"methods": [method], "tasks": ["linseg"], "storage": tmp},
                                           "tracking": {"uri": f"sqlite:///{tmp}/mlruns.db"}})
            n = len(build_dataset("synthetic", cfg.data["synthetic"], "train"))
            out = os.path.join(tmp, "direct")
            t = time.perf_counter()
            train_loop(loop_config(cfg, method, cfg.pretrain_for(method), out, threads))
            evaluate_method(method, os.path.join(out, "final.pt"), ["linseg"], eval_spec(cfg, method, n), out,
                            threads=threads)
            direct_s = time.perf_counter() - t
            t = time.perf_counter()
            res = new_search(cfg, TuneOptions(method=method, task="linseg", trials=1, concurrent=1, asha=False,
                                              name="perf"), console=Console(file=io.StringIO()))
            search_s = time.perf_counter() - t
            trial = res["trials"][0]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        trial_s = trial["wall_s"] or float("nan")
        rows.append({"method": method, "steps": steps, "direct_s": direct_s, "trial_s": trial_s,
                     "trial_over_direct": trial_s / direct_s, "overhead_per_trial_s": trial_s - direct_s,
                     "search_s": search_s, "status": trial["status"]})
    return rows


# ------------------------------------------------------------------------------------------------ report

def to_markdown(report: dict) -> str:
    lines = ["# bench perf", "", "Environment: " + ", ".join(f"{k} {v}" for k, v in report["env"].items()), ""]
    for name, rows in report["results"].items():
        lines.append(f"## {name}")
        lines.append("")
        if isinstance(rows, dict):
            rows = [{"phase": k, "seconds": v} for k, v in rows.get("phases_s", {}).items()] + \
                   [{"phase": "total (wall)", "seconds": rows.get("wall_s")}]
        if not rows:
            lines.append("(no rows)")
            continue
        cols = list(rows[0])
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for r in rows:
            lines.append("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def run_perf(only: list[str], methods: list[str], out_prefix: str, tiny: bool = False, steps: int = 30,
             console=None) -> dict:
    from rich.console import Console

    console = console or Console()
    unknown = [o for o in only if o not in ALL]
    if unknown:
        raise BenchError(f"--only: unknown benchmark {', '.join(unknown)}; valid: {', '.join(ALL)}")
    folder = os.path.dirname(os.path.abspath(out_prefix))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"--out {out_prefix}: cannot create {folder} ({exc.strerror})") from None
    report = {"env": environment(), "results": {}}
    if os.path.exists(out_prefix + ".json"):
        # a partial re-run (--only) keeps the other benchmarks' results already in the file
        try:
            report["results"] = {k: v for k, v in ckpt.load_json(out_prefix + ".json").get("results", {}).items()
                                 if k in ALL}
        except (ValueError, OSError, AttributeError):
            pass
    console.print("environment: " + ", ".join(f"{k} {v}" for k, v in report["env"].items()))
    batch = 8 if tiny else 32
    for name in only:
        t = time.perf_counter()
        if name == "sinkhorn":
            res = bench_sinkhorn(tiny)
        elif name == "kmeans":
            res = bench_kmeans(tiny)
        elif name == "ray":
            res = bench_ray(methods, 12 if tiny else steps, batch)
        elif name == "data":
            res = bench_data(methods, 8 if tiny else 64, batch)
        elif name == "tune":
            res = bench_tune(methods, 3 if tiny else steps, batch, tiny)
        else:
            sets = ([] if not tiny else ["pretrain.epochs=1", "pretrain.steps_per_epoch=2", "pretrain.batch_size=8",
                                         "data.synthetic.num_train=32", "data.synthetic.num_val=8",
                                         "tasks.linseg.epochs=1"])
            res = bench_headline(methods, sets)
        report["results"][name] = res
        console.print(f"[bold]{name}[/bold] ({time.perf_counter() - t:.0f}s): {res}")
    ckpt.save_json(report, out_prefix + ".json")
    ckpt.atomic_write_bytes(out_prefix + ".md", lambda fh: fh.write(to_markdown(report).encode()))
    console.print(f"wrote {out_prefix}.json and {out_prefix}.md")
    return report
