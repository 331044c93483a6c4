"""Leopart (Ziegler & Asano, CVPR 2022): dense clustering fine-tuning of a ViT, the spatial SwAV baseline.

``src/leopart.py`` (``shared/specs/methods.md`` §4): a student ViT and EMA teacher (backbone, per-token MLP head and
unit-norm prototypes); multi-crop views whose crops overlap every global crop (``views.py``); for each global crop
the teacher's token scores (with an optional per-crop queue scored by the student's prototypes) give Sinkhorn codes,
and :class:`LeopartLoss` (``loss.py``) aligns codes and student predictions on the crops' intersections, optionally
under the teacher's foreground mask (``model.py``). AdamW with the backbone at a fraction of the head's lr.
Evaluation uses the student backbone (the reference's validation reads ``self.model``). The reference fine-tunes
DINO weights; from a random init the default mask is ``all``. CPU-default deviations: ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.data.views import SWAV_JITTER, scaled_jitter
from bench.errors import BenchError
from bench.ranges import at_least, fraction, momentum_value, positive, ranged
from bench.registry import METHODS
from methods.base import Method, Schedule, split_decay
from methods.common.crops import forward_by_resolution
from methods.common.sinkhorn import EmbeddingQueue, swav_codes
from methods.common.teacher import EMASchedule, make_teacher
from methods.leopart.loss import LeopartLoss, roi_boxes as _roi_boxes, to_map  # noqa: F401  (re-exported)
from methods.leopart.model import LeopartNet, TokenHead, foreground_mask  # noqa: F401
from methods.leopart.views import LeopartViews, LeopartViewSpec  # noqa: F401


# ------------------------------------------------------------------------------------------------ config

@dataclass
class LeopartConfig:
    # ---- views
    global_size: int = at_least(64, 1)  # ref 224
    local_size: int = at_least(32, 1)  # ref 96
    n_local: int = at_least(2, 0)  # ref 4
    global_scale: tuple = ranged((0.25, 1.0), gt=0, le=1)
    local_scale: tuple = ranged((0.05, 0.25), gt=0, le=1)
    min_intersection: float = fraction(0.01)
    jitter_strength: float = at_least(0.25, 0)  # colour jitter (0.8s, 0.8s, 0.8s, 0.2s), p 0.8; ref s = 1
    blur_ref_size: int = 224  # view blur σ scaled by crop side / this (CPU default); 0: σ in pixels (ref)
    # ---- model
    hidden_dim: int = at_least(512, 1)  # ref 2048
    out_dim: int = at_least(128, 2)  # ref 256
    n_layers_head: int = at_least(3, 1)
    n_prototypes: int = at_least(300, 2)
    momentum_teacher: float = momentum_value(0.99)  # ref 0.9995 (cosine to momentum_teacher_end)
    momentum_teacher_end: float = fraction(1.0)
    use_teacher: bool = True
    # ---- loss
    temperature: float = positive(0.1)
    epsilon: float = positive(0.05)
    sinkhorn_iters: int = at_least(3, 1)
    roi_size: int = at_least(4, 1)  # ref 7 on a 14×14 grid
    loss_mask: str = "all"  # fg | all | bg; ref "fg" from DINO weights, "all" in train_in_scratch_config.yml
    fg_threshold: float = ranged(0.6, gt=0, le=1)  # fraction of the attention mass kept
    blur_sigma: float = positive(0.6)
    blur_kernel: int = at_least(7, 1)
    max_small_component: int = at_least(2, 0)  # components of at most this many pixels are dropped
    queue_length: int = at_least(2048, 0)  # per global crop, global (split over workers); ref 8192; 0 disables
    queue_per_image: int = at_least(10, 0)  # at most this × B foreground embeddings pushed per step
    # ---- optimisation
    backbone_lr_scale: float = positive(0.3)  # ref 0.1 (lr 1e-5 backbone / 1e-4 heads, from DINO weights)

    def validate(self, where: str) -> None:
        if self.blur_ref_size < 0:
            raise BenchError(f"{where}.blur_ref_size: expected 0 (σ in pixels) or a positive crop side, "
                             f"got {self.blur_ref_size}")
        if self.loss_mask not in ("fg", "all", "bg"):
            raise BenchError(f"{where}.loss_mask: expected fg, all or bg, got '{self.loss_mask}'")
        if self.n_prototypes < 2 or self.out_dim < 2 or self.n_layers_head < 1:
            raise BenchError(f"{where}: n_prototypes and out_dim must be at least 2, n_layers_head at least 1")
        if self.temperature <= 0 or self.epsilon <= 0 or self.sinkhorn_iters < 1 or self.roi_size < 1:
            raise BenchError(f"{where}: temperature, epsilon must be positive; sinkhorn_iters, roi_size at least 1")
        if not 0 < self.fg_threshold <= 1:
            raise BenchError(f"{where}.fg_threshold: expected a fraction in (0, 1], got {self.fg_threshold}")
        if self.jitter_strength < 0:
            raise BenchError(f"{where}.jitter_strength: expected a non-negative number, got {self.jitter_strength}")
        if self.queue_length < 0 or self.n_local < 0:
            raise BenchError(f"{where}: queue_length and n_local must be >= 0")


# ------------------------------------------------------------------------------------------------ method

@METHODS.register("leopart")
class Leopart(Method):
    config_class = LeopartConfig
    # ref: AdamW, lr 1e-4 heads / 1e-5 backbone, cosine to 0, no warm-up, wd 0.04 → 0.5, 50 epochs from DINO
    # weights. From a random init the CPU default trains ten times faster (see docs/methods.md).
    pretrain_defaults = {"optimizer": "adamw", "lr": 1e-3, "min_lr": 0.0, "warmup_epochs": 0.0, "epochs": 2,
                         "weight_decay": 0.04, "weight_decay_end": 0.5, "clip_grad": 0.0}

    def __init__(self, cfg: LeopartConfig, backbone_factory, schedule: Schedule):
        super().__init__(cfg, backbone_factory, schedule)
        backbone = backbone_factory()
        if not backbone.is_vit:
            raise BenchError(f"methods.leopart: needs a ViT backbone (tokens and [CLS] attention), got '{backbone.name}'")
        for name, size in (("global_size", cfg.global_size), ("local_size", cfg.local_size)):
            if size % backbone.stride:
                raise BenchError(f"methods.leopart.{name}: {size} is not a multiple of the patch size {backbone.stride}")
        self.patch = backbone.stride
        self.student = LeopartNet(backbone, cfg.hidden_dim, cfg.out_dim, cfg.n_layers_head, cfg.n_prototypes)
        self.teacher = make_teacher(self.student) if cfg.use_teacher else None
        self.ema = EMASchedule(cfg.momentum_teacher, schedule.total_steps, cfg.momentum_teacher_end)
        self.loss_fn = LeopartLoss(cfg.temperature, cfg.roi_size, self.patch)
        local_len = cfg.queue_length // max(schedule.world_size, 1)
        self.queues = nn.ModuleList([EmbeddingQueue(local_len, cfg.out_dim, init="zeros") for _ in range(2)]) \
            if local_len > 0 else None
        self._ddp_params_and_buffers_to_ignore = (
            [f"queues.{i}.{b}" for i in range(2) for b in ("items", "pushed")] if self.queues is not None else [])

    def view_spec(self) -> LeopartViewSpec:
        c = self.cfg
        s = c.jitter_strength
        return LeopartViewSpec(n_global=2, global_size=c.global_size, global_scale=tuple(c.global_scale),
                               n_local=c.n_local, local_size=c.local_size, local_scale=tuple(c.local_scale),
                               flip_p=0.0, jitter=scaled_jitter(SWAV_JITTER, s), jitter_p=0.8, grayscale_p=0.2,
                               blur_p=(0.5, 0.5, 0.5), solarize_p=(0.0, 0.0, 0.0),
                               min_intersection=c.min_intersection, min_intersection_globals=2 * c.min_intersection,
                               blur_ref_size=c.blur_ref_size)

    # ---- training
    @torch.no_grad()
    def teacher_targets(self, crops: list[torch.Tensor]) -> tuple[list, list, tuple]:
        """Per global crop: Sinkhorn codes B×K×h×w and the foreground mask B×1×h×w (None with ``loss_mask=all``);
        each crop's queue is scored, then fed with this step's teacher embeddings (foreground ones with a mask)."""
        c = self.cfg
        teacher = self.teacher if self.teacher is not None else self.student
        x = torch.cat(crops[:2])
        fg = None
        if c.loss_mask != "all":
            t_emb, t_scores, t_grid, attn = teacher.forward_with_attention(x)
            fg = foreground_mask(attn, t_grid, c.fg_threshold, c.blur_sigma, c.blur_kernel, c.max_small_component)
            if c.loss_mask == "bg":
                fg = 1.0 - fg
        else:
            t_emb, t_scores, t_grid = teacher(x)
        masks = list(fg.chunk(2)) if fg is not None else [None, None]
        b = crops[0].shape[0]
        codes = []
        for ci, (emb, scores) in enumerate(zip(t_emb.chunk(2), t_scores.chunk(2))):
            scores = scores.reshape(-1, scores.shape[-1])  # (B·N)×K
            q_scores = None
            if self.queues is not None:
                queue = self.queues[ci]
                if queue.full:
                    q_scores = queue.scores(self.student.prototypes.weight)
                emb = emb.reshape(-1, emb.shape[-1])
                if masks[ci] is not None:
                    emb = emb[masks[ci].reshape(-1) > 0.5]
                n_store = min(b * c.queue_per_image, queue.length)
                queue.push(emb[torch.randperm(emb.shape[0], device=emb.device)[:n_store]])
            code = swav_codes(scores, q_scores, c.epsilon, c.sinkhorn_iters)
            codes.append(to_map(code.reshape(b, -1, code.shape[-1]), t_grid))
        return codes, masks, t_grid

    def training_step(self, batch: dict, step: int) -> dict:
        crops = batch["views"]
        self.student.prototypes.normalize_()
        if self.teacher is not None:
            self.teacher.prototypes.normalize_()
        codes, masks, _ = self.teacher_targets(crops)
        student = forward_by_resolution(self.student, crops)
        loss, fg_frac = self.loss_fn(codes, masks, student, batch["boxes"].float(), batch["flips"],
                                     [tuple(v.shape[-2:]) for v in crops])
        out = {"loss": loss, "momentum": self.ema.momentum(step)}
        if self.cfg.loss_mask != "all":
            out["fg_fraction"] = fg_frac
        return out

    def after_step(self, step: int) -> None:
        if self.teacher is not None:
            self.ema.update(self.teacher, self.student, step)

    def param_groups(self) -> list[dict]:
        groups = []
        for part, scale in ((self.student.backbone, self.cfg.backbone_lr_scale),
                            (nn.ModuleList([self.student.head, self.student.prototypes]), 1.0)):
            for g in split_decay(part.named_parameters()):
                g["lr_scale"] = scale
                groups.append(g)
        return groups

    # ---- evaluation
    def eval_backbone(self):
        return self.student.backbone

    @classmethod
    def search_space(cls) -> dict:
        from ray import tune

        return {
            "temperature": tune.loguniform(0.05, 0.3),
            "epsilon": tune.loguniform(0.02, 0.1),
            "n_prototypes": tune.choice([50, 100, 300, 500]),
            "queue_length": tune.choice([0, 2048, 8192]),
            "momentum_teacher": tune.uniform(0.98, 0.9995),
            "backbone_lr_scale": tune.loguniform(0.05, 1.0),
        }
