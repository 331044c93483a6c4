"""The pretraining loop: a plain function run by Ray Train's ``TorchTrainer`` on every worker.

The one ``TorchTrainer`` is built by ``bench.launch``; orchestration (Ray start, progress, MLflow) lives in
``bench.pipeline``; this module only trains. Everything a worker needs arrives as one frozen
``bench.loopconfig.LoopConfig`` (validated sections: method, method_cfg, pretrain, backbone, dataset,
dataset_cfg, seed, out_dir); its plain-dict form is accepted too and validated here.

Files under ``out_dir`` (shared storage on a cluster):
    checkpoints/step_XXXXXXX.pt   atomic, the newest two kept; a restarted worker or a re-run resumes here
    metrics.jsonl                 one JSON line per logged step (rank 0), read by the driver for progress/MLflow
    final.pt                      the trained method's state, written last (atomic)
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Iterator

import torch

from bench import checkpoint as ckpt
from bench.data import build_dataset
from bench.errors import BenchError
from bench.loopconfig import LoopConfig
from bench.data.views import PretrainViews, build_view_transform, collate_views
from bench.optim import build_optimizer, clip_per_tensor, set_schedule
from methods.build import build_method, load_trained_method, plan_schedule  # noqa: F401 (re-exported)
from bench.viewrng import RngCollate, restore
from methods.common.schedules import cosine_schedule


class EpochSampler(torch.utils.data.Sampler):
    """Deterministic per-epoch permutation, sharded by rank, that can start mid-epoch.

    Yields ``epoch * N + index`` so the view pipeline can seed each sample's augmentation from
    (seed, epoch, index): a resumed run sees exactly the views an uninterrupted one would have seen.
    """

    def __init__(self, n: int, batch_per_rank: int, steps_per_epoch: int, rank: int, world: int, seed: int):
        self.n, self.b, self.spe = n, batch_per_rank, steps_per_epoch
        self.rank, self.world, self.seed = rank, world, seed
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, start_step: int) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        need = self.spe * self.b * self.world
        perm = torch.randperm(self.n, generator=g)
        while len(perm) < need:  # tiny datasets: wrap around
            perm = torch.cat([perm, torch.randperm(self.n, generator=g)])
        perm = perm[:need].view(self.spe, self.world, self.b)[:, self.rank]  # spe × b
        for idx in perm[self.start_step:].reshape(-1).tolist():
            yield self.epoch * self.n + idx

    def __len__(self) -> int:
        return (self.spe - self.start_step) * self.b


class SeededViews(torch.utils.data.Dataset):
    """Decodes ``epoch * N + index`` and seeds the augmentation of that sample."""

    def __init__(self, views: PretrainViews, seed: int):
        self.views, self.seed, self.n = views, seed, len(views)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int) -> dict:
        epoch, index = divmod(key, self.n)
        torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)
        return self.views[index]


def _context():
    """(rank, world, train context or None): works inside Ray Train and in a plain process."""
    try:
        import ray

        if not ray.is_initialized():  # a plain process: never start Ray just to ask
            return 0, 1, None
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size(), ctx
    except Exception:
        return 0, 1, None


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, list):
        return [_to_device(b, device) for b in batch]
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


RESULT_FILE = "loop_result.json"


def loop_result(out_dir: str, returned=None) -> dict:
    """A finished loop's figures: ``<out_dir>/loop_result.json`` (rank 0 writes it beside ``final.pt``), else
    ``returned`` (what the fit returned) when it is a dict, else {}."""
    path = os.path.join(out_dir, RESULT_FILE)
    if os.path.exists(path):
        try:
            return ckpt.load_json(path)
        except (OSError, ValueError):
            pass
    return returned if isinstance(returned, dict) else {}


def train_loop(loop_config: LoopConfig | dict) -> dict:
    """Pretrain one method; returns final figures (Ray Train keeps rank 0's return value), also written to
    ``<out_dir>/loop_result.json`` next to ``final.pt``."""
    started_at = time.time()
    lc = LoopConfig.coerce(loop_config).sections()
    rank, world, ctx = _context()
    pcfg, bcfg = lc.pretrain, lc.backbone
    seed = lc.seed
    out_dir = lc.out_dir
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    if pcfg.cpus_per_worker > 0:
        torch.set_num_threads(pcfg.cpus_per_worker)

    use_gpu = pcfg.gpu and torch.cuda.is_available()
    if use_gpu and ctx is not None:
        import ray.train.torch as rtt

        device = rtt.get_device()
    else:
        device = torch.device("cuda" if use_gpu else "cpu")
    bf16 = pcfg.precision == "bf16" or (pcfg.precision == "auto" and use_gpu)

    dataset = build_dataset(lc.dataset, lc.dataset_cfg, "train")
    if pcfg.batch_size % world:
        raise ValueError(f"pretrain.batch_size {pcfg.batch_size} is not divisible by {world} workers")
    per_rank = pcfg.batch_size // world
    schedule = plan_schedule(pcfg, len(dataset), world)

    torch.manual_seed(seed)  # identical init on every worker (DDP also broadcasts rank 0's weights)
    method = build_method(lc.method, lc.method_cfg, bcfg, schedule)
    transform = build_view_transform(method.view_spec())
    method.to(device)
    groups = method.param_groups()
    trainable = [p for g in groups for p in g["params"]]
    optimizer = build_optimizer(groups, pcfg)
    _record_worker(out_dir, rank, world)
    model = wrap_data_parallel(method, world)

    total = schedule.total_steps
    spe = schedule.steps_per_epoch
    warmup = int(pcfg.warmup_epochs * spe)
    lrs = cosine_schedule(pcfg.lr, pcfg.min_lr, total, warmup, start_warmup=pcfg.lr * pcfg.warmup_start_factor)
    wds = cosine_schedule(pcfg.weight_decay, pcfg.weight_decay_end, total)

    # ---- resume: the newest complete checkpoint of this run, if any
    start = 0
    state = ckpt.load_latest_step(ckpt_dir)  # a corrupt newest one: the previous one, with a warning
    if state is not None:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])

    sampler = EpochSampler(len(dataset), per_rank, spe, rank, world, seed)
    loader = torch.utils.data.DataLoader(
        SeededViews(PretrainViews(dataset, transform), seed), batch_size=per_rank, sampler=sampler,
        num_workers=pcfg.loader_workers, collate_fn=RngCollate(collate_views), drop_last=True,
        persistent_workers=pcfg.loader_workers > 0, pin_memory=use_gpu)  # one fork per run, not per epoch:
        # the worker keeps its rendered-scene cache across epochs

    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        _truncate_metrics(metrics_path, start)
    proxy = None  # held-out proxy score for ASHA (bench/proxy.py); off unless pretrain.proxy_every > 0
    if pcfg.proxy_every > 0 and rank == 0:
        from bench.proxy import Proxy

        proxy = Proxy.from_loop_config(lc, pcfg)

    method.train()
    peak = PeakMemory(use_gpu)
    step = start
    last = {}
    t_window, n_window = time.perf_counter(), 0
    t_start = time.perf_counter()
    images_per_s = float("nan")
    while step < total:
        epoch = step // spe
        sampler.set_position(epoch, step % spe)
        for item in loader:
            batch = restore(item)  # the global RNG as if the views were built here (bench/viewrng.py)
            set_schedule(optimizer, float(lrs[step]), float(wds[step]))
            batch = _to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(batch, step)
            loss = out["loss"]
            if (step + 1) % pcfg.log_every == 0:
                peak.sample()  # after the forward pass: the activations are all held
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {float(loss)} at step {step}; lower pretrain.lr or check the method config")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_per_tensor(trainable, pcfg.clip_grad) if pcfg.clip_grad > 0 else torch.zeros(())
            method.on_after_backward(step)
            optimizer.step()
            method.after_step(step)
            step += 1
            n_window += 1
            proxy_now = pcfg.proxy_every > 0 and (step % pcfg.proxy_every == 0 or step == total)
            if step % pcfg.log_every == 0 or step == total or proxy_now:
                now = time.perf_counter()
                images_per_s = n_window * pcfg.batch_size / max(now - t_window, 1e-9)
                t_window, n_window = now, 0
                last = {"step": step, "epoch": epoch, "loss": float(loss.detach()), "lr": float(lrs[step - 1]),
                        "wd": float(wds[step - 1]), "grad_norm": float(grad_norm), "images_per_s": images_per_s}
                last.update({k: float(v) for k, v in out.items() if k != "loss" and _is_number(v)})
                if proxy is not None and proxy_now:
                    last.update(proxy.metrics(method, device))
                    t_window = time.perf_counter()  # the proxy's time is not training throughput
                if rank == 0:
                    with open(metrics_path, "a") as fh:
                        fh.write(json.dumps(last) + "\n")
                _report(ctx, last)
            if step % pcfg.checkpoint_every == 0 and step < total:
                _save_step(method, optimizer, step, ckpt_dir, rank)
            if step >= total or step % spe == 0:
                break
    wall = time.perf_counter() - t_start
    result = {"steps": step, "resumed_from": start, "final_loss": last.get("loss", float("nan")),
              "images_per_s": (step - start) * pcfg.batch_size / max(wall, 1e-9), "wall_s": wall,
              "started_at": started_at, "ended_at": time.time(), **_compute_figures(method, peak)}
    if rank == 0:
        ckpt.save_torch({"method": lc.method, "step": step, "method_state": method.state_dict(),
                         "eval_backbone_prefix": method.eval_backbone_prefix()},  # --init needs no method
                        os.path.join(out_dir, "final.pt"))
        ckpt.save_json(result, os.path.join(out_dir, RESULT_FILE))  # what the driver reads (bench.launch)
        ckpt.prune(ckpt_dir, keep=0)
    return result


class PeakMemory:
    """This loop's peak memory in MiB: the CUDA allocator's peak on GPU (reset when the loop starts); on CPU the
    process's peak resident set size if this loop raised it, else the largest one sampled after forward passes.
    One worker may run several loops (``bench.launch.train_sequence``), and ``ru_maxrss`` is per process."""

    def __init__(self, use_gpu: bool):
        self.use_gpu = use_gpu
        self.sampled = 0.0
        if use_gpu:
            torch.cuda.reset_peak_memory_stats()
        self.before = self._maxrss()

    @staticmethod
    def _maxrss() -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def sample(self) -> None:
        if self.use_gpu:
            return
        try:
            with open("/proc/self/statm") as fh:
                rss_pages = int(fh.read().split()[1])
            self.sampled = max(self.sampled, rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20)
        except (OSError, ValueError, IndexError):  # no /proc: only the process-wide peak is known
            pass

    def value(self) -> float:
        if self.use_gpu:
            return torch.cuda.max_memory_allocated() / 2**20
        now = self._maxrss()
        return now if now > self.before or not self.sampled else self.sampled


def _compute_figures(method, peak: PeakMemory) -> dict:
    """Trainable parameters and this loop's peak memory (MiB)."""
    params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    return {"train_params": int(params), "peak_mem_mb": float(peak.value())}


def wrap_data_parallel(method, world: int):
    """DDP (through Ray Train) when there are several workers; SyncBN first where the method asks for it."""
    if world <= 1:
        return method
    import ray.train.torch as rtt

    model = method
    if method.sync_bn:  # batch statistics over the global batch, as the reference
        if next(method.parameters()).is_cuda:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
        else:  # torch's SyncBatchNorm is GPU-only; the same all-reduced statistics on CPU workers
            from methods.common.global_bn import convert_all_global_bn

            model = convert_all_global_bn(method)
    # unused parameters are legitimate here (e.g. a teacher-only branch, frozen prototypes)
    return rtt.prepare_model(model, move_to_device=False, parallel_strategy_kwargs={"find_unused_parameters": True})


def _record_worker(out_dir: str, rank: int, world: int) -> None:
    """Where each rank runs (node, pid): lets tests and users check placement across nodes."""
    import socket

    node = ""
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    ckpt.save_json({"rank": rank, "world": world, "pid": os.getpid(), "node_id": node,
                    "host": socket.gethostname()}, os.path.join(out_dir, "workers", f"rank_{rank}.json"))


def _is_number(v) -> bool:
    if isinstance(v, (int, float)):
        return math.isfinite(float(v))
    return isinstance(v, torch.Tensor) and v.numel() == 1


def _truncate_metrics(path: str, start: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = [ln for ln in fh if ln.strip()]
    kept = []
    for ln in lines:
        try:
            if json.loads(ln)["step"] <= start:
                kept.append(ln)
        except (ValueError, KeyError):
            continue
    ckpt.atomic_write_bytes(path, lambda fh: fh.write("".join(kept).encode()))


def _save_step(method, optimizer, step: int, ckpt_dir: str, rank: int) -> None:
    if rank == 0:
        ckpt.save_torch({"step": step, "method": method.state_dict(), "optimizer": optimizer.state_dict()},
                        os.path.join(ckpt_dir, f"step_{step:07d}.pt"))
        ckpt.prune(ckpt_dir, keep=2)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    except Exception:
        pass


def _report(ctx, metrics: dict) -> None:
    if ctx is None:
        return
    import ray.train

    ray.train.report(metrics)


def read_metrics(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as fh:
        for ln in fh:
            try:
                rows.append(json.loads(ln))
            except ValueError:
                continue
    return rows
