"""DINO (Caron et al., ICCV 2021): self-distillation with no labels, the image-level baseline.

Student and EMA teacher (momentum cosine to 1 per iteration), DINOHead (MLP, L2 norm, weight-normalised last layer),
centring over all workers, teacher-temperature warm-up per epoch, multi-crop (2 global + local crops, the teacher
sees the globals), last layer frozen during the first epoch (``shared/specs/methods.md`` §0.2). The loss is
``methods.common.dino_loss.DINOLoss`` (shared with CrOC). The evaluation backbone is the teacher's, as in the
reference. CPU-default deviations (head widths, crop counts and sizes, ``embedding=patch_mean``, ``jitter_strength``)
are config fields; why they were chosen, with the measurements, is in ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.data.views import BYOL_JITTER, MultiCropSpec, scaled_jitter
from bench.errors import BenchError
from bench.ranges import at_least, momentum_value, positive, ranged
from bench.registry import METHODS
from methods.base import Method, Schedule
from methods.common.crops import forward_by_resolution
from methods.common.dino_loss import DINOLoss
from methods.common.heads import DINOHead
from methods.common.teacher import EMASchedule, SelfDistillationHooks, make_teacher


@dataclass
class DINOConfig:
    out_dim: int = at_least(1024, 2)  # ref 65536
    hidden_dim: int = at_least(512, 1)  # ref 2048
    bottleneck_dim: int = at_least(128, 1)  # ref 256
    # ref False. On the CPU default (batch 32, ~150 steps) the BN-free head collapsed to uniform outputs
    # (loss stuck at ln(out_dim), DINO issue #43's failure mode); BN over the batch keeps the targets informative.
    use_bn_in_head: bool = True
    norm_last_layer: bool = True
    momentum_teacher: float = momentum_value(0.99)  # ref 0.996
    teacher_temp: float = positive(0.04)
    warmup_teacher_temp: float = positive(0.04)
    warmup_teacher_temp_epochs: int = at_least(0, 0)
    student_temp: float = positive(0.1)
    center_momentum: float = momentum_value(0.9)
    freeze_last_layer: int = at_least(1, 0)  # epochs during which the last layer's gradients are discarded
    global_size: int = at_least(64, 1)  # ref 224
    local_size: int = at_least(32, 1)  # ref 96
    n_local: int = at_least(2, 0)  # ref 8
    global_scale: tuple = ranged((0.4, 1.0), gt=0, le=1)
    local_scale: tuple = ranged((0.05, 0.4), gt=0, le=1)
    embedding: str = "patch_mean"  # head input: patch_mean | cls (ref; see docs/methods.md)
    jitter_strength: float = at_least(0.25, 0)  # colour jitter (0.4s, 0.4s, 0.2s, 0.1s), p 0.8; ref s = 1
    blur_ref_size: int = 224  # view blur σ scaled by crop side / this (CPU default); 0: σ in pixels (ref)

    def validate(self, where: str) -> None:
        if self.blur_ref_size < 0:
            raise BenchError(f"{where}.blur_ref_size: expected 0 (σ in pixels) or a positive crop side, "
                             f"got {self.blur_ref_size}")
        if self.embedding not in ("cls", "patch_mean"):
            raise BenchError(f"{where}.embedding: expected cls or patch_mean, got '{self.embedding}'")
        if self.jitter_strength < 0:
            raise BenchError(f"{where}.jitter_strength: expected a non-negative number, got {self.jitter_strength}")


class DINOPair(nn.Module):
    """Backbone + head on the image-level embedding (``embed``)."""

    def __init__(self, backbone, head, embedding="cls"):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.embedding = embedding

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """B×3×H×W -> B×C image embedding: the [CLS] token, or the mean of the patch tokens (``patch_mean``; the
        pooled map for CNNs either way)."""
        if self.embedding == "cls" or not self.backbone.is_vit:
            return self.backbone.forward_pooled(x)
        return self.backbone.forward_tokens(x)[1].mean(dim=1)

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """V crops (B×3×s_v×s_v) -> V logits B×out_dim; crops of equal size share one forward."""
        return forward_by_resolution(lambda x: self.head(self.embed(x)), crops)


@METHODS.register("dino")
class DINO(SelfDistillationHooks, Method):
    config_class = DINOConfig
    # lr 1e-3 for the CPU default's batch 32 (ref 0.0005·B/256 over 100+ epochs; far too slow for 240 steps);
    # 5 epochs: 58.30 vs 57.06 with 3, and `bench run --methods dino` stays under 5 minutes
    pretrain_defaults = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.04, "weight_decay_end": 0.4,
                         "clip_grad": 3.0, "epochs": 5}

    def __init__(self, cfg: DINOConfig, backbone_factory, schedule: Schedule):
        super().__init__(cfg, backbone_factory, schedule)
        backbone = backbone_factory()
        head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                        use_bn=cfg.use_bn_in_head, norm_last_layer=cfg.norm_last_layer)
        self.student = DINOPair(backbone, head, cfg.embedding)
        self.teacher = make_teacher(self.student)
        self.loss_fn = DINOLoss(cfg.out_dim, cfg.teacher_temp, cfg.warmup_teacher_temp,
                                cfg.warmup_teacher_temp_epochs, schedule.epochs, cfg.student_temp,
                                cfg.center_momentum)
        self.ema = EMASchedule(cfg.momentum_teacher, schedule.total_steps)
        # BatchNorm in the head normalises over the batch: SyncBN across workers, as the reference does
        self.sync_bn = cfg.use_bn_in_head

    def view_spec(self) -> MultiCropSpec:
        c = self.cfg
        return MultiCropSpec(n_global=2, global_size=c.global_size, global_scale=tuple(c.global_scale),
                             n_local=c.n_local, local_size=c.local_size, local_scale=tuple(c.local_scale),
                             jitter=scaled_jitter(BYOL_JITTER, c.jitter_strength), blur_ref_size=c.blur_ref_size)

    def training_step(self, batch: dict, step: int) -> dict:
        views = batch["views"]
        epoch = step // max(self.schedule.steps_per_epoch, 1)
        with torch.no_grad():
            teacher_out = self.teacher(views[:2])
        student_out = self.student(views)
        loss = self.loss_fn(student_out, teacher_out, epoch)
        return {"loss": loss, "teacher_temp": self.loss_fn.teacher_temp(epoch), "momentum": self.ema.momentum(step)}

    @classmethod
    def search_space(cls) -> dict:
        from ray import tune

        return {
            "teacher_temp": tune.uniform(0.02, 0.07),
            "student_temp": tune.uniform(0.05, 0.2),
            "momentum_teacher": tune.uniform(0.98, 0.999),
            "center_momentum": tune.uniform(0.8, 0.99),
        }
