"""Test support shared by several test files (``from tests.support import ...``; never shipped in the package).

- ``tiny_argv``: ``--set`` options of a few-step pretraining and evaluation for end-to-end CLI tests.
- ``single_process`` / ``data_parallel``: the data-parallel equivalence check, one training step on N Ray
  Train workers vs one process.

Every worker builds the method from the same seed, takes its equal shard of the same global batch, and runs
forward + backward under DDP; the mean of the workers' losses and the DDP-averaged gradients must equal the
single-process loss and gradients on the whole batch when every cross-sample statistic (Sinkhorn sums,
centering, queues, batch norm) is all-reduced as the specs say.
"""

from __future__ import annotations

import torch

from bench.backbones import create_backbone
from bench.data.synthetic import SyntheticConfig, SyntheticScenes
from bench.data.views import PretrainViews, build_view_transform, collate_views
from methods.base import Schedule


# Small settings shared by end-to-end tests: a few steps of batch 8 on 64 training images.
TINY_SETS = [
    "pretrain.epochs=1", "pretrain.steps_per_epoch=3", "pretrain.batch_size=8", "pretrain.log_every=1",
    "pretrain.checkpoint_every=2", "data.synthetic.num_train=64", "data.synthetic.num_val=16",
    "tasks.linseg.epochs=2", "tasks.linseg.drop_at=1",
]


def tiny_argv(*extra: str) -> list[str]:
    out = []
    for s in TINY_SETS:
        out += ["--set", s]
    return out + list(extra)


def _build(method: str, method_cfg: dict, seed: int, steps: int = 100, world: int = 1):
    from bench.registry import METHODS
    from bench.config import build

    cls = METHODS.get(method)
    cfg = build(cls.config_class, method_cfg, f"methods.{method}")
    torch.manual_seed(seed)
    return cls(cfg, lambda: create_backbone("vit_tiny_d4_p8"), Schedule(total_steps=steps, steps_per_epoch=steps // 2,
                                                                        epochs=2, world_size=world))


def global_batch(method_obj, n_images: int, seed: int) -> dict:
    data = SyntheticScenes(SyntheticConfig(num_train=max(n_images, 1), num_val=1), "train")
    views = PretrainViews(data, build_view_transform(method_obj.view_spec()))
    samples = []
    for i in range(n_images):
        torch.manual_seed(seed * 1000 + i)
        samples.append(views[i])
    return collate_views(samples)


def shard(batch, rank: int, world: int):
    """Rank's equal slice along the sample axis of every tensor (lists are per-view tensors)."""
    if isinstance(batch, torch.Tensor):
        n = batch.shape[0] // world
        return batch[rank * n:(rank + 1) * n]
    if isinstance(batch, list):
        if batch and isinstance(batch[0], torch.Tensor):
            return [shard(b, rank, world) for b in batch]
        n = len(batch) // world
        return batch[rank * n:(rank + 1) * n]
    if isinstance(batch, dict):
        return {k: shard(v, rank, world) for k, v in batch.items()}
    return batch


def _step(method_obj, model, batch, seed: int) -> tuple[float, dict]:
    method_obj.train()
    torch.manual_seed(seed)
    out = model(batch, 0)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in method_obj.named_parameters() if p.grad is not None}
    return float(out["loss"].detach()), grads


def single_process(method: str, method_cfg: dict, n_images: int, seed: int = 0) -> dict:
    m = _build(method, method_cfg, seed)
    batch = global_batch(m, n_images, seed)
    loss, grads = _step(m, m, batch, seed)
    return {"loss": loss, "grads": grads}


def _worker(config: dict) -> dict:
    import ray.train

    from bench.pretrain import wrap_data_parallel
    from methods.common.dist import all_reduce_mean

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    results = {}
    for method, method_cfg in config["methods"].items():
        m = _build(method, method_cfg, config["seed"], world=world)
        batch = shard(global_batch(m, config["n_images"], config["seed"]), rank, world)
        model = wrap_data_parallel(m, world)
        loss, grads = _step(m, model, batch, config["seed"])
        loss = float(all_reduce_mean(torch.tensor(loss)))
        # Ray Train cannot return tensors from workers: numpy arrays travel instead
        results[method] = {"loss": loss, "grads": {k: v.numpy() for k, v in grads.items()}}
    return results


def data_parallel(methods: dict, n_images: int, workers: int = 2, seed: int = 0) -> dict:
    """{method: method_cfg} -> {method: {"loss", "grads"}} from ``workers`` Ray Train CPU workers."""
    import tempfile

    from bench.launch import launch_pretraining
    from bench.raycluster import init_ray

    init_ray()
    result = launch_pretraining({"methods": methods, "n_images": n_images, "seed": seed}, worker=_worker,
                                storage=tempfile.mkdtemp(prefix="bench-dp-"), workers=workers, cpus_per_worker=1)
    return {m: {"loss": r["loss"], "grads": {k: torch.from_numpy(v) for k, v in r["grads"].items()}}
            for m, r in result.return_value.items()}
