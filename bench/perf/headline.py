"""The headline benchmark of ``bench perf``: ``bench run --methods vice,clove,croc --tasks linseg`` timed by phase
(the pipeline's own timings: Ray start, each pretraining, each evaluation, logging), and with ``--profile`` a
per-op profile: torch.profiler over a few training steps of each method's configured recipe (shares of the view
pipeline, forward, backward, optimiser and EMA, and the top ops), and over one linseg evaluation (feature
extraction, probe training, validation). Op shares are fractions of one profiled run; they locate hot spots
and are no timing."""

from __future__ import annotations

import tempfile
import time

import torch

STEP_REGIONS = ("views", "forward", "backward", "optimizer", "after_step")
EVAL_REGIONS = ("evaluate", "features")  # features: the frozen backbone's forwards inside the evaluation
TOP_OPS = 12


def bench_headline(methods: list[str], sets: list[str], profile: bool = False, profile_steps: int = 5) -> dict:
    from bench.config import load_config
    from bench.pipeline import Pipeline

    run_id = f"perf-{int(time.time())}"
    cfg = load_config(None, sets, {"run": {"methods": methods, "tasks": ["linseg"], "run_id": run_id, "cache": False,
                                           "results_dir": tempfile.mkdtemp(prefix="bench-perf-results-")}})
    pipe = Pipeline(cfg, progress=False)
    store = scene_store_state()
    t = time.perf_counter()
    pipe.run()
    wall = time.perf_counter() - t
    out = {"methods": methods, "wall_s": wall, "phases_s": dict(pipe.timings.phases), "scene_store": store}
    if profile:
        out["profile"] = profile_headline(cfg, methods, profile_steps)
    return out


def scene_store_state() -> str:
    """"cold" (an empty or new store: the run renders its scenes once, as on a fresh machine), "warm" or "off"
    (bench/data/scene_store.py; ``BENCH_DATA_CACHE=$(mktemp -d)`` measures a cold run)."""
    import os

    from bench.data import scene_store

    folder = scene_store.store_dir()
    if folder is None:
        return "off"
    return "warm" if os.path.isdir(folder) and any(f.endswith(".npz") for f in os.listdir(folder)) else "cold"


def _shares(prof, regions: tuple[str, ...], top: int = TOP_OPS) -> dict:
    """{"regions": [{region, ms, share}], "top_ops": [{op, self_ms, share, calls}]} from a finished profiler;
    region shares are of the regions' sum, op shares of all ops' self time."""
    avgs = prof.key_averages()
    reg = {a.key: a.cpu_time_total / 1e3 for a in avgs if a.key in regions}
    total_reg = sum(reg.values()) or float("nan")
    ops = [a for a in avgs if a.key not in regions and not a.key.startswith("ProfilerStep")]
    total_ops = sum(a.self_cpu_time_total for a in ops) / 1e3 or float("nan")
    ops.sort(key=lambda a: a.self_cpu_time_total, reverse=True)
    return {"regions": [{"region": r, "ms": reg.get(r, 0.0), "share": reg.get(r, 0.0) / total_reg} for r in regions],
            "top_ops": [{"op": a.key, "self_ms": a.self_cpu_time_total / 1e3,
                         "share": a.self_cpu_time_total / 1e3 / total_ops, "calls": a.count} for a in ops[:top]]}


def profile_step(cfg, method: str, steps: int) -> dict:
    """torch.profiler over ``steps`` training steps of ``method`` with its configured recipe (one process, batch =
    the global batch, the views built in the step as one loader worker would), after one unprofiled step."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from bench.config import to_dict
    from bench.data import build_dataset
    from bench.data.views import PretrainViews, build_view_transform, collate_views
    from bench.optim import build_optimizer, clip_per_tensor
    from bench.pretrain import build_method, plan_schedule

    pcfg = cfg.pretrain_for(method)
    name = cfg.run.pretrain_dataset()
    data = build_dataset(name, cfg.data[name], "train")
    torch.manual_seed(cfg.run.seed)
    m = build_method(method, to_dict(cfg.methods[method]), cfg.backbone, plan_schedule(pcfg, len(data), 1))
    views = PretrainViews(data, build_view_transform(m.view_spec()))
    groups = m.param_groups()
    params = [p for g in groups for p in g["params"]]
    opt = build_optimizer(groups, pcfg)
    m.train()
    b = pcfg.batch_size

    def step(i: int) -> None:
        with record_function("views"):
            batch = collate_views([views[(i * b + j) % len(data)] for j in range(b)])
        with record_function("forward"):
            loss = m(batch, i)["loss"]
        with record_function("backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("optimizer"):
            if pcfg.clip_grad > 0:
                clip_per_tensor(params, pcfg.clip_grad)
            m.on_after_backward(i)
            opt.step()
        with record_function("after_step"):
            m.after_step(i)

    step(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(1, steps + 1):
            step(i)
    return {"method": method, "steps": steps, "batch": b, **_shares(prof, STEP_REGIONS)}


def profile_eval(cfg, n_pretrain: int) -> dict:
    """torch.profiler over one linseg evaluation of the untrained backbone (the same architecture and sizes as
    every method's evaluation on the CPU default). Regions: ``evaluate`` (all of it: data, features, probe epochs,
    validation) and ``features`` (the backbone's forwards within it); the rest is the probe and the data."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import bench.evaluate as ev
    from bench.evaluate import eval_spec

    method = cfg.run.methods[0]
    spec = eval_spec(cfg, method, n_pretrain)
    spec["tasks"] = {"linseg": spec["tasks"]["linseg"]}
    device = torch.device("cpu")
    feats, _module = ev.feature_fn(method, None, spec, device)

    def labelled(x: torch.Tensor) -> torch.Tensor:
        with record_function("features"):
            return feats(x)

    from bench.config import build
    from bench.registry import TASKS

    cls = TASKS.get("linseg")
    task = cls(build(cls.config_class, spec["tasks"]["linseg"], "tasks.linseg"))
    data = ev.load_eval_data(spec["eval_dataset"], spec["eval_dataset_cfg"])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("evaluate"):
            task.evaluate(labelled, data, device)
    out = _shares(prof, EVAL_REGIONS)
    regions = {r["region"]: r["ms"] for r in out["regions"]}
    total = regions.get("evaluate") or float("nan")
    out["regions"] = [{"region": "features (backbone forwards)", "ms": regions.get("features", 0.0),
                       "share": regions.get("features", 0.0) / total},
                      {"region": "rest (data, probe epochs, validation)",
                       "ms": total - regions.get("features", 0.0), "share": 1 - regions.get("features", 0.0) / total}]
    return out


def profile_headline(cfg, methods: list[str], steps: int) -> dict:
    from bench.data import build_dataset

    name = cfg.run.pretrain_dataset()
    n = len(build_dataset(name, cfg.data[name], "train"))
    return {"steps": [profile_step(cfg, m, steps) for m in methods], "eval": profile_eval(cfg, n)}
