"""``bench perf --gpu``: each method's paper-scale training step at bf16 on one GPU (images/s, peak memory, model
FLOP utilisation), the view pipeline's images/s, linseg feature-extraction throughput, and the cluster task's
k-means (the torch engine on the GPU), in one command
(about 8 minutes or less on one GPU). Results: ``<out>-gpu.json`` and ``<out>-gpu.md`` (``results/perf-gpu.md``).

MFU = FLOPs of one step (forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode``: matmuls
and convolutions, the usual MFU convention) / measured step seconds / the device's dense bf16 peak
(``PEAK_BF16_TFLOPS``, from the vendors' data sheets; ``--peak-tflops`` for another device).
"""

from __future__ import annotations

import os
import time

import torch

from bench.errors import BenchError

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity); the first matching name wins, so specific names come first
PEAK_BF16_TFLOPS = [
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.05), ("L40", 181.05), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0), ("RTX 6000 Ada", 364.25), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("A6000", 154.8),
]
STEPS, WARMUP = 10, 3
DATA_IMAGES = 256
EXTRACT_BATCH, EXTRACT_SIZE = 60, 448  # the leopart linseg preset: 448-px inputs, batch 60


def peak_bf16_flops(device_name: str, override_tflops: float = 0.0) -> float | None:
    """FLOP/s of the device's dense bf16 peak, or None when the name is not in the table (no MFU then)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def mfu(flops_per_step: float, step_s: float, peak_flops: float | None) -> float:
    """Model FLOP utilisation in [0, 1]: achieved FLOP/s over the peak; NaN without a peak or a time."""
    if not peak_flops or step_s <= 0:
        return float("nan")
    return flops_per_step / step_s / peak_flops


def count_flops(fn) -> int:
    """FLOPs of everything ``fn()`` runs (forward and, when it calls backward, backward), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------------------------
# PAPER-SCALE STAND-IN, to be replaced by the `paper` recipes (methods/recipes/<m>.yaml, bench/recipes.py) once
# they are merged: (backbone, method overrides, per-GPU batch) with the reference's compute-relevant values
# (crop sizes and counts, head widths, backbones) from specs/methods.md. The lead swaps `paper_scale` for the
# recipe loader; nothing else here depends on where the values come from. ViCE: the reference's dilated
# ResNet-50 (output stride 8) at 400 px is not built yet; on the stride-32 ResNet-50 the view must be a multiple
# of 32, so 384 px.
PAPER_SCALE = {
    "dino": ("vit_small_p16", {"global_size": 224, "local_size": 96, "n_local": 8, "out_dim": 65536,
                               "hidden_dim": 2048, "bottleneck_dim": 256}, 64),
    "croc": ("vit_small_p16", {"global_size": 224}, 64),
    "leopart": ("vit_small_p16", {"global_size": 224, "local_size": 96, "n_local": 4, "hidden_dim": 2048,
                                  "out_dim": 256, "roi_size": 7}, 32),
    "clove": ("resnet50", {"global_size": 224, "local_size": 96, "n_local": 6, "proj_hidden_dim": 4096}, 64),
    "vice": ("resnet50", {"view_size": 384, "min_img_size": 500, "n_views": 5, "decoder_dim": 256}, 16),
}


def paper_scale(method: str) -> tuple[str, dict, int]:
    """(backbone name, method config overrides, per-GPU batch) of ``method``'s paper-scale step."""
    if method not in PAPER_SCALE:
        raise BenchError(f"--gpu: no paper-scale configuration for method '{method}'; known: "
                         f"{', '.join(PAPER_SCALE)}")
    return PAPER_SCALE[method]
# ---------------------------------------------------------------------------------------------------------------


def require_gpu() -> str:
    if not torch.cuda.is_available():
        raise BenchError("bench perf --gpu: no CUDA GPU is visible (torch.cuda.is_available() is False); run it on "
                         "a machine with a GPU, or drop --gpu for the CPU benchmarks")
    return torch.cuda.get_device_name(0)


def _source_px(overrides: dict) -> int:
    crop = overrides.get("global_size") or overrides.get("view_size") or 224
    return max(int(1.5 * crop), overrides.get("min_img_size", 0))


def _build(method: str, seed: int = 0):
    """(method on CPU, pretrain config, batch, source image side) at paper scale."""
    from bench.config import BackboneConfig, load_config, to_dict
    from bench.pretrain import build_method, plan_schedule

    backbone, over, batch = paper_scale(method)
    cfg = load_config(None, [f"pretrain.batch_size={batch}"], {"run": {"methods": [method]}})
    pcfg = cfg.pretrain_for(method)
    torch.manual_seed(seed)
    m = build_method(method, {**to_dict(cfg.methods[method]), **over}, BackboneConfig(name=backbone),
                     plan_schedule(pcfg, 100_000, 1))
    return m, pcfg, batch, _source_px(over)


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, list):
        return [_to(b, device) for b in batch]
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def bench_step(method: str, peak: float | None) -> dict:
    """Images/s, peak memory and MFU of ``method``'s paper-scale step (bf16 autocast, the loop's order)."""
    from bench.data.synthetic import SyntheticConfig, SyntheticScenes
    from bench.data.views import PretrainViews, build_view_transform, collate_views
    from bench.optim import build_optimizer

    dev = torch.device("cuda")
    m, pcfg, batch, source = _build(method)
    data = SyntheticScenes(SyntheticConfig(size=source, num_train=batch, num_val=1, cache=True), "train")
    views = PretrainViews(data, build_view_transform(m.view_spec()))
    b = _to(collate_views([views[i] for i in range(batch)]), dev)
    m.to(dev).train()
    opt = build_optimizer(m.param_groups(), pcfg)
    i = 0

    def step() -> None:
        nonlocal i
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(b, i)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        m.on_after_backward(i)
        opt.step()
        m.after_step(i)
        i += 1

    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(STEPS):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t) / STEPS
    peak_mem = torch.cuda.max_memory_allocated() / 2**30
    flops = count_flops(step)
    backbone = paper_scale(method)[0]
    row = {"method": method, "backbone": backbone, "batch": batch, "step_s": step_s, "images_per_s": batch / step_s,
           "peak_mem_gib": peak_mem, "tflops_per_step": flops / 1e12, "achieved_tflops": flops / step_s / 1e12,
           "mfu": mfu(flops, step_s, peak)}
    del m, opt, b
    torch.cuda.empty_cache()
    return row


def bench_views(method: str, workers: int) -> dict:
    """The view pipeline's images/s for ``method``'s paper-scale views: one process, and ``workers`` DataLoader
    processes (what feeds the GPU)."""
    from bench.data.synthetic import SyntheticConfig, SyntheticScenes
    from bench.data.views import PretrainViews, build_view_transform, collate_views

    m, _, batch, source = _build(method)
    data = SyntheticScenes(SyntheticConfig(size=source, num_train=DATA_IMAGES, num_val=1, cache=True), "train")
    for i in range(DATA_IMAGES):
        data[i]  # render once: scene synthesis is not the view pipeline
    views = PretrainViews(data, build_view_transform(m.view_spec()))
    n1 = min(64, DATA_IMAGES)
    t = time.perf_counter()
    for i in range(n1):
        views[i]
    one = n1 / (time.perf_counter() - t)
    loader = torch.utils.data.DataLoader(views, batch_size=batch, num_workers=workers, collate_fn=collate_views,
                                         persistent_workers=False)
    it = iter(loader)
    next(it)  # workers started and warm
    t, n = time.perf_counter(), 0
    for b in it:
        n += batch
    many = n / max(time.perf_counter() - t, 1e-9)
    return {"method": method, "source_px": source, "one_process_images_per_s": one, "loader_workers": workers,
            "loader_images_per_s": many}


def bench_extract(peak: float | None) -> list[dict]:
    """linseg feature extraction (frozen ViT-S/16 forward_dense at 448 px, batch 60): fp32 and bf16 images/s."""
    from bench.backbones import create_backbone

    dev = torch.device("cuda")
    model = create_backbone("vit_small_p16").to(dev).eval()
    x = torch.randn(EXTRACT_BATCH, 3, EXTRACT_SIZE, EXTRACT_SIZE, device=dev)
    rows = []
    for precision in ("fp32", "bf16"):
        def run() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                model.forward_dense(x)

        for _ in range(WARMUP):
            run()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(STEPS):
            run()
        torch.cuda.synchronize()
        s = (time.perf_counter() - t) / STEPS
        flops = count_flops(run)
        rows.append({"backbone": "vit_small_p16", "input_px": EXTRACT_SIZE, "batch": EXTRACT_BATCH,
                     "precision": precision, "images_per_s": EXTRACT_BATCH / s,
                     "mfu_vs_bf16_peak": mfu(flops, s, peak)})
    return rows


def run_gpu(methods: list[str], out_prefix: str, peak_tflops: float = 0.0, console=None) -> dict:
    """All GPU benchmarks; writes ``<out_prefix>-gpu.json`` and ``.md``. One clear line without a GPU."""
    from rich.console import Console

    from bench import checkpoint as ckpt
    from bench.perf.common import environment
    from bench.perf.micro import bench_kmeans
    from bench.perf.report import to_markdown

    name = require_gpu()
    for method in methods:
        paper_scale(method)  # an unknown method fails before any work
    console = console or Console()
    peak = peak_bf16_flops(name, peak_tflops)
    env = {**environment(), "bf16_peak_tflops": peak / 1e12 if peak else "unknown (pass --peak-tflops)"}
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    report = {"env": env, "results": {}}
    t0 = time.perf_counter()
    for key, fn in (("step_bf16", lambda: [bench_step(m, peak) for m in methods]),
                    ("views", lambda: [bench_views(m, workers) for m in methods]),
                    ("linseg_extract", lambda: bench_extract(peak)),
                    # the cluster task's k-means (torch) on the GPU
                    ("kmeans", lambda: bench_kmeans(seeds=3, gpu=True))):
        t = time.perf_counter()
        report["results"][key] = fn()
        console.print(f"[bold]{key}[/bold] ({time.perf_counter() - t:.0f}s): {report['results'][key]}")
    report["env"]["wall_s"] = time.perf_counter() - t0
    ckpt.save_json(report, out_prefix + "-gpu.json")
    ckpt.atomic_write_bytes(out_prefix + "-gpu.md",
                            lambda fh: fh.write(to_markdown(report, "bench perf --gpu").encode()))
    console.print(f"wrote {out_prefix}-gpu.json and {out_prefix}-gpu.md")
    return report
