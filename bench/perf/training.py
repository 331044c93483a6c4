"""Training-side benchmarks of ``bench perf``: Ray Train's overhead (worker group and local mode), the view pipeline against the step, the cost
table (step time vs crop size and batch size per method), 1 vs 2 Ray Train CPU workers, and the views built in
the training process vs in a DataLoader worker."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time

import torch

from bench.perf.common import _loop_cfg, _steady_images_per_s, _timeit

COST_CROPS = (64, 96, 128, 224)  # global crop / view side in pixels (local crops keep their ratio to it)
COST_BATCHES = (16, 32)


def _timed_fit(method: str, steps: int, batch: int, local: bool) -> tuple[dict, float, float]:
    """One ``TorchTrainer`` fit of ``method``'s loop on this process's threads (``local``: Ray Train's local mode,
    else a one-worker group): (the loop's result, wall seconds of ``fit()``, steady images/s)."""
    from bench.launch import pretraining_trainer

    threads = torch.get_num_threads()
    tmp = tempfile.mkdtemp(prefix="bench-perf-")
    try:
        cfg = _loop_cfg(method, steps, os.path.join(tmp, "loop"), batch)
        cfg["pretrain"]["cpus_per_worker"] = threads
        trainer = pretraining_trainer(cfg, storage=os.path.join(tmp, "storage"), workers=1, cpus_per_worker=threads,
                                      local=local)
        t = time.perf_counter()
        res = trainer.fit().return_value
        return res, time.perf_counter() - t, _steady_images_per_s(os.path.join(tmp, "loop"), batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_ray(methods: list[str], steps: int, batch: int) -> list[dict]:
    """The same loop three ways: called directly, through ``TorchTrainer`` in Ray Train's local mode (how ``bench
    run`` pretrains on CPUs, ``bench.fitting.run_here``) and in a one-worker Ray Train worker group. The first two
    run before this benchmark starts Ray (``ray_up_for_local`` says whether something else had), as in ``bench
    run``; steady images/s skip each loop's first logged window."""
    import ray

    from bench.pretrain import train_loop
    from bench.raycluster import init_ray

    ray_up = ray.is_initialized()
    rows = []
    for method in methods:
        tmp = tempfile.mkdtemp(prefix="bench-perf-")
        try:
            t = time.perf_counter()
            direct = train_loop(_loop_cfg(method, steps, os.path.join(tmp, "direct"), batch))
            wall_direct = time.perf_counter() - t
            direct_steady = _steady_images_per_s(os.path.join(tmp, "direct"), batch)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        local, wall_local, local_steady = _timed_fit(method, steps, batch, local=True)
        rows.append({"method": method, "steps": steps, "direct_images_per_s": direct_steady,
                     "local_images_per_s": local_steady, "local_ratio": local_steady / direct_steady,
                     "direct_all_steps_images_per_s": direct["images_per_s"],
                     "local_all_steps_images_per_s": local["images_per_s"],
                     "direct_wall_s": wall_direct, "local_wall_s": wall_local, "ray_up_for_local": ray_up})
    init_ray()
    for row in rows:
        res, wall_ray, ray_steady = _timed_fit(row["method"], steps, batch, local=False)
        row.update({"ray_images_per_s": ray_steady, "ratio": ray_steady / row["direct_images_per_s"],
                    "ray_all_steps_images_per_s": res["images_per_s"], "ray_wall_s": wall_ray})
    return rows


def _method_step(m, opt):
    """One optimiser step of method ``m`` on a fixed batch, as the loop does it (forward, backward, step, EMA)."""
    i = 0

    def step(batch) -> None:
        nonlocal i
        out = m(batch, i)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        m.on_after_backward(i)
        opt.step()
        m.after_step(i)
        i += 1
    return step


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


def crop_overrides(defaults: dict, size: int, stride: int) -> dict:
    """Method config overrides for global crops / views of ``size`` px: ``global_size`` (local crops scaled by the
    same factor, to a multiple of the backbone's ``stride``) or ViCE's ``view_size`` (with ``min_img_size``
    scaled alike); {} for a method with neither field."""
    out: dict = {}
    if "global_size" in defaults:
        out["global_size"] = size
        if "local_size" in defaults:
            local = size * defaults["local_size"] / defaults["global_size"]
            out["local_size"] = max(stride, stride * round(local / stride))
    elif "view_size" in defaults:
        out["view_size"] = size
        if "min_img_size" in defaults:
            out["min_img_size"] = int(math.ceil(size * defaults["min_img_size"] / defaults["view_size"]))
    return out


def bench_cost(methods: list[str], crops=COST_CROPS, batches=COST_BATCHES, repeats: int = 2) -> list[dict]:
    """Per method, crop size and batch size: seconds per training step (forward, backward, optimiser, EMA) on the
    CPU backbone after one untimed step, and the view pipeline's seconds for that batch in one process, so
    ``steps × max(step_s, views_s / loader workers)`` predicts a run's pretraining time."""
    from bench.backbones import create_backbone
    from bench.config import load_config, to_dict
    from bench.data.synthetic import SyntheticConfig, SyntheticScenes
    from bench.data.views import PretrainViews, build_view_transform, collate_views
    from bench.optim import build_optimizer
    from bench.pretrain import build_method, plan_schedule

    rows = []
    for method in methods:
        cfg = load_config(None, [], {"run": {"methods": [method]}})
        pcfg = cfg.pretrain_for(method)
        defaults = to_dict(cfg.methods[method])
        stride = create_backbone(cfg.backbone.name).stride
        for size in crops:
            over = crop_overrides(defaults, size, stride)
            source = max(96, int(math.ceil(1.5 * size)), over.get("min_img_size", 0))
            data = SyntheticScenes(SyntheticConfig(size=source, num_train=max(batches), num_val=1), "train")
            for batch in batches:
                torch.manual_seed(0)
                m = build_method(method, {**defaults, **over}, cfg.backbone, plan_schedule(pcfg, 1536, 1))
                views = PretrainViews(data, build_view_transform(m.view_spec()))
                t = time.perf_counter()
                b = collate_views([views[i] for i in range(batch)])
                views_s = time.perf_counter() - t
                m.train()
                step = _method_step(m, build_optimizer(m.param_groups(), pcfg))
                step_s = _timeit(lambda: step(b), repeats)
                rows.append({"method": method, "crop": size, "batch": batch, "step_s": step_s,
                             "images_per_s": batch / step_s, "views_s": views_s, "source_px": source,
                             "overrides": " ".join(f"{k}={v}" for k, v in over.items())})
                del m, b
    return rows


def bench_scaling(methods: list[str], steps: int, batch: int) -> list[dict]:
    """Ray Train CPU workers at one global batch: 1 worker × 1 CPU, 2 workers × 1 CPU (DDP), and 1 worker × 2 CPU
    threads. Scaling efficiency = images/s with 2 workers / (2 × images/s with 1), steady windows only."""
    from bench.launch import pretraining_trainer
    from bench.pretrain import train_loop
    from bench.raycluster import init_ray

    init_ray()
    rows = []
    for method in methods:
        ips = {}
        for workers, cpus in ((1, 1), (2, 1), (1, 2)):
            tmp = tempfile.mkdtemp(prefix="bench-perf-scaling-")
            try:
                cfg = _loop_cfg(method, steps, os.path.join(tmp, "out"), batch)
                cfg["pretrain"]["cpus_per_worker"] = cpus
                cfg["pretrain"]["workers"] = workers
                trainer = pretraining_trainer(cfg, storage=os.path.join(tmp, "ray_storage"), workers=workers,
                                              cpus_per_worker=cpus)
                trainer.fit()
                ips[(workers, cpus)] = _steady_images_per_s(os.path.join(tmp, "out"), batch)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        one, two, threads = ips[(1, 1)], ips[(2, 1)], ips[(1, 2)]
        rows.append({"method": method, "steps": steps, "batch": batch, "w1x1_images_per_s": one,
                     "w2x1_images_per_s": two, "w1x2threads_images_per_s": threads,
                     "scaling_efficiency": two / (2 * one), "workers_over_threads": two / threads})
    return rows


def bench_loader(methods: list[str], steps: int, batch: int) -> list[dict]:
    """The pretraining loop in this process with the views built in the training process (``loader_workers`` 0)
    and in 1 DataLoader worker process, back to back: steady images/s of each and their ratio. The numbers are
    the same either way (bench/viewrng.py); this decides the faster default for the machine."""
    from bench.pretrain import train_loop

    rows = []
    threads = torch.get_num_threads()
    for method in methods:
        ips = {}
        for workers in (0, 1):
            tmp = tempfile.mkdtemp(prefix="bench-perf-loader-")
            try:
                cfg = _loop_cfg(method, steps, os.path.join(tmp, "out"), batch)
                cfg["pretrain"]["cpus_per_worker"] = threads
                cfg["pretrain"]["loader_workers"] = workers
                train_loop(cfg)
                ips[workers] = _steady_images_per_s(os.path.join(tmp, "out"), batch)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        rows.append({"method": method, "steps": steps, "batch": batch, "threads": threads,
                     "in_process_images_per_s": ips[0], "one_worker_images_per_s": ips[1],
                     "worker_speedup": ips[1] / ips[0]})
    return rows
