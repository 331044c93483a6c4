"""Video object segmentation by label propagation (DINO's ``eval_video_segmentation``; protocols.md §7.3).

Semi-supervised: the first frame's object masks are given and propagated through the clip by frozen-feature
affinity (tasks/propagation.py: the first frame plus the last ``n_last_frames`` = 7, spatial window of radius
``neighbourhood`` = 12 tokens, top-5, temperature 0.1).

1. Frames are resized so the short side is ``short_side`` (480 for DAVIS; 0 = native) and the long side is
   floored to a multiple of 64 (DINO's ``read_frame``: 854×480 -> 832×480), then to a multiple of the backbone's
   stride. ImageNet mean/std normalisation (DINO's frame reader uses std 0.228 for red, a 0.4 % difference).
   Features D×h×w per frame.
2. The first annotation is nearest-resized to the resized frame, then to the token grid, one-hot over
   background + N objects (void counts as background there).
3. Each propagated map is bilinearly upsampled to the resized frame, every channel min-max rescaled, argmax,
   then nearest-resized to the original frame size.
4. Scores as the DAVIS-2017 semi-supervised evaluation: per object and frame J (region IoU) and F (boundary
   F-measure, tolerance 0.008 × image diagonal), void pixels left out, first and last frames excluded; per
   object the mean over frames; ``j_mean`` / ``f_mean`` = means over all objects of all clips, ``jf`` their
   average; ``j_recall`` / ``f_recall`` = mean over objects of the fraction of frames scoring > 0.5. Percent.

Data: a video dataset (``is_video``: ``davis17``, ``synthetic_video``). The task declares ``data_kind =
"video"``; given an image dataset it evaluates on that dataset's declared video counterpart
(``VIDEO_COUNTERPART``: ``synthetic`` -> ``synthetic_video``, built with the image dataset's size, seed and tones),
so ``--tasks vos`` runs on the default; otherwise it fails with one line naming the video datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.nn import functional as F

from bench.data import IGNORE_INDEX
from bench.errors import BenchError
from bench.registry import DATASETS, TASKS
from tasks.base import EvalData, FeatureFn, Task, TaskResult
from tasks.cluster import normalize_images
from tasks.metrics import boundary_f, region_j
from tasks.propagation import min_max_per_channel, propagate_video

VIDEO_COUNTERPART = {"synthetic": "synthetic_video"}  # image dataset -> the video dataset vos evaluates on
PRESETS = {
    "synthetic": dict(short_side=0),  # native 96-px clips (12×12 tokens with ViT-tiny/8)
    "davis": dict(short_side=480),  # DINO's DAVIS-2017 setting
}


@dataclass
class VosConfig:
    preset: str = "synthetic"  # synthetic | davis; unset fields take the preset's value
    short_side: Optional[int] = None  # resize frames so the short side is this (0 = native)
    n_last_frames: int = 7  # previous frames in the context (plus the first frame)
    neighbourhood: int = 12  # spatial window radius in tokens (0 = the whole frame)
    topk: int = 5
    temperature: float = 0.1
    bound_th: float = 0.008  # F's boundary tolerance: fraction of the image diagonal (>= 1: pixels)
    max_videos: int = 0  # 0 = every clip of the val split
    frame_batch: int = 16  # frames per feature forward pass

    def validate(self, where: str) -> None:
        if self.preset not in PRESETS:
            raise BenchError(f"{where}.preset: unknown preset '{self.preset}'; valid: {', '.join(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.short_side < 0 or self.n_last_frames < 0 or self.neighbourhood < 0 or self.max_videos < 0:
            raise BenchError(f"{where}: short_side, n_last_frames, neighbourhood and max_videos must be >= 0")
        if self.topk < 1 or self.temperature <= 0 or self.bound_th <= 0 or self.frame_batch < 1:
            raise BenchError(f"{where}: topk and frame_batch must be >= 1, temperature and bound_th positive")


def video_data(data: EvalData) -> tuple[str, object]:
    """(name, val split) of the video dataset to evaluate on: ``data`` itself when it is a video dataset,
    else its declared counterpart (:data:`VIDEO_COUNTERPART`)."""
    if getattr(data.val, "is_video", False):
        return data.name, data.val
    target = VIDEO_COUNTERPART.get(data.name)
    if target is None:
        videos = sorted(n for n in DATASETS.names() if getattr(DATASETS.get(n), "is_video", False))
        raise BenchError(f"--tasks vos: eval dataset '{data.name}' is not a video dataset and has no video "
                         f"counterpart; use --eval-data with one of {', '.join(videos)}")
    cls = DATASETS.get(target)
    cfg = cls.config_class()
    src = getattr(data.val, "cfg", None)
    for key in ("size", "seed", "saturation", "tones", "regions"):
        if src is not None and hasattr(src, key) and hasattr(cfg, key):
            setattr(cfg, key, getattr(src, key))
    cfg.validate(f"data.{target}")
    return target, cls(cfg, "val")


def _resized_size(h: int, w: int, short: int, stride: int) -> tuple[int, int]:
    """DINO's ``read_frame`` sizes: short side ``short``, long side scaled and floored to a multiple of 64;
    then (and for native frames, ``short=0``) both sides floored to a multiple of the backbone stride."""
    if short:
        if h <= w:
            h, w = short, int((short * w / h) // 64 * 64)
        else:
            h, w = int((short * h / w) // 64 * 64), short
    return max(stride, h - h % stride), max(stride, w - w % stride)


def protocol_line(cfg: VosConfig, n_objects: int, n_clips: int, dataset: str) -> str:
    """The leaderboard's protocol line; results/reference.yaml matches on its head and substrings."""
    return (f"vos[{cfg.preset}]: label propagation, first + last {cfg.n_last_frames} frames, neighbourhood "
            f"{cfg.neighbourhood}, top-{cfg.topk}, temperature {cfg.temperature}, short side "
            f"{cfg.short_side or 'native'}, J&F (DAVIS-2017, boundary tolerance {cfg.bound_th}, first and last "
            f"frames excluded) over {n_objects} objects, {n_clips} {dataset} val clips")


@TASKS.register("vos")
class VideoSegmentation(Task):
    config_class = VosConfig
    primary = "jf"
    data_kind = "video"  # see VIDEO_COUNTERPART

    def evaluate(self, features: FeatureFn, data: EvalData, device: torch.device, backbone=None) -> TaskResult:
        cfg = self.cfg
        name, videos = video_data(data)
        n = len(videos) if not cfg.max_videos else min(cfg.max_videos, len(videos))
        stride = self._stride(features, device)
        j_obj, f_obj, j_rec, f_rec = [], [], [], []
        for v in range(n):
            item = videos[v]
            pred = self.segment(features, item["frames"], item["masks"][0], item["num_objects"], stride, device)
            js, fs = score_video(pred, item["masks"], item["num_objects"], cfg.bound_th)
            for oj, of in zip(js, fs):
                if len(oj):
                    j_obj.append(np.mean(oj))
                    f_obj.append(np.mean(of))
                    j_rec.append(np.mean(np.asarray(oj) > 0.5))
                    f_rec.append(np.mean(np.asarray(of) > 0.5))
        if not j_obj:
            raise BenchError(f"vos: no objects to score in {name} val ({n} clips; each needs >= 3 frames)")
        j, f = 100.0 * float(np.mean(j_obj)), 100.0 * float(np.mean(f_obj))
        metrics = {"jf": (j + f) / 2, "j_mean": j, "f_mean": f, "j_recall": 100.0 * float(np.mean(j_rec)),
                   "f_recall": 100.0 * float(np.mean(f_rec))}
        protocol = protocol_line(cfg, len(j_obj), n, name)
        return TaskResult(metrics=metrics, protocol=protocol,
                          per_class={"j_per_object": [100.0 * float(x) for x in j_obj],
                                     "f_per_object": [100.0 * float(x) for x in f_obj]})

    @staticmethod
    def _stride(features: FeatureFn, device) -> int:
        with torch.no_grad():
            out = features(torch.zeros(1, 3, 64, 64, device=device))
        return max(1, 64 // out.shape[-1])

    def segment(self, features: FeatureFn, frames: torch.Tensor, first_mask: torch.Tensor, num_objects: int,
                stride: int, device) -> torch.Tensor:
        """frames uint8 T×3×H×W, first_mask H×W ids -> T×H×W predicted ids (frame 0 = the given mask)."""
        cfg = self.cfg
        t, _, H, W = frames.shape
        th, tw = _resized_size(H, W, cfg.short_side, stride)
        feats = []
        with torch.no_grad():
            for s in range(0, t, cfg.frame_batch):
                x = frames[s:s + cfg.frame_batch].to(device)
                if (th, tw) != (H, W):
                    x = F.interpolate(x.float(), size=(th, tw), mode="bilinear", align_corners=False,
                                      antialias=True).round().clamp(0, 255)
                feats.append(F.normalize(features(normalize_images(x)).float(), dim=1))
        feats = torch.cat(feats)  # T×D×h×w
        h, w = feats.shape[-2:]
        first = first_mask.long().clone()
        first[(first == IGNORE_INDEX) | (first > num_objects)] = 0
        small = F.interpolate(first[None, None].float(), size=(th, tw), mode="nearest-exact")
        small = F.interpolate(small, size=(h, w), mode="nearest-exact")[0, 0].long().to(device)
        labels = F.one_hot(small, num_objects + 1).permute(2, 0, 1).float()
        outs = propagate_video(feats, labels, cfg.n_last_frames, cfg.neighbourhood, cfg.topk, cfg.temperature)
        preds = [first_mask.long().clone()]
        for lab in outs:
            up = F.interpolate(lab[None], size=(th, tw), mode="bilinear", align_corners=False)[0]
            seg = min_max_per_channel(up).argmax(0)
            seg = F.interpolate(seg[None, None].float(), size=(H, W), mode="nearest-exact")[0, 0].long()
            preds.append(seg.cpu())
        return torch.stack(preds)


def score_video(pred: torch.Tensor, gt: torch.Tensor, num_objects: int, bound_th: float = 0.008):
    """pred, gt T×H×W object ids (gt 255 = void) -> per object (1..N): lists of J and F over frames 1..T−2."""
    pred, gt = pred.numpy(), gt.numpy()
    void = gt == IGNORE_INDEX
    js: list = [[] for _ in range(num_objects)]
    fs: list = [[] for _ in range(num_objects)]
    for t in range(1, gt.shape[0] - 1):
        for o in range(1, num_objects + 1):
            js[o - 1].append(region_j(pred[t] == o, gt[t] == o, void[t]))
            fs[o - 1].append(boundary_f(pred[t] == o, gt[t] == o, void[t], bound_th))
    return js, fs
