"""CrOC (Stegmüller, Lebailly et al., CVPR 2023): cross-view online clustering for dense visual representations.

The authors' code (``stegmuel/CrOC`` ``main_croc.py``; ``shared/specs/methods.md`` §3). A ViT student and EMA
teacher share one DINO head with two output layers ([CLS] and centroids). The teacher clusters the joint tokens of
both views per (image, head) on its last block's keys, with positions in source-image pixels (``clustering.py``);
the same assignments pool the teacher's and the student's last-layer tokens into centroids, and :class:`CrOCLoss`
(``loss.py``) is DINO's loss on [CLS] plus α_s × DINO's loss on matched centroids. The teacher is deterministic
(no drop-path). Shapes for one step (B images, h heads, N = (s/patch)² tokens per view, P = B·h problems): views
2×(B×3×s×s) -> teacher tokens 2B×(1+N)×C and keys 2B×h×(1+N)×d -> problems P×2×N×d with positions P×2×N×2 ->
weights P×2×N×K -> centroids n_valid×C per view -> centroid logits 2·n_valid×out_dim_c. CPU-default deviations,
distributed and edge-case choices: ``docs/methods.md``.
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
from methods.common.dist import global_count, global_mean
from methods.common.geometry import cell_centers
from methods.common.heads import DINOHead
from methods.common.teacher import EMASchedule, SelfDistillationHooks, make_teacher
from methods.common.vit_tokens import last_block_attention, tokens_and_head_features
from methods.croc.clustering import ClusterResult, cluster_views, view_centroids
from methods.croc.loss import CrOCLoss


@dataclass
class CrOCConfig:
    # head (ref: hidden 2048, bottleneck 256, out_dim 65536, out_dim_c 8192)
    out_dim: int = at_least(1024, 2)
    out_dim_c: int = at_least(256, 2)
    hidden_dim: int = at_least(512, 1)
    bottleneck_dim: int = at_least(128, 1)
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    momentum_teacher: float = momentum_value(0.99)  # ref 0.996
    # image-level DINO loss on [CLS]
    teacher_temp: float = positive(0.04)
    warmup_teacher_temp: float = positive(0.04)
    warmup_teacher_temp_epochs: int = at_least(0, 0)
    student_temp: float = positive(0.1)  # CrOCLoss's own default; the ref's --student_temp (1.0) reaches nothing
    center_momentum: float = momentum_value(0.9)
    # object-level (centroid) loss
    teacher_temp_c: float = positive(0.04)
    warmup_teacher_temp_c: float = positive(0.04)
    student_temp_c: float = positive(0.1)
    center_momentum_c: float = momentum_value(0.9)
    alpha_s: float = at_least(1.0, 0)  # weight of the centroid loss
    # clustering
    which_features: str = "k"  # q | k | v of the last block
    lambda_pos: float = at_least(4.0, 0)  # ref --pos_alpha
    n_tokens: int = at_least(5, 2)  # seeds = the largest K tried
    n_centroids_max: int = at_least(4, 2)  # K* ∈ {2, …, n_centroids_max}
    sinkhorn_lambda: float = positive(20.0)
    sinkhorn_iterations: int = at_least(5, 1)
    uniform_marginals: bool = False
    marginals_temp_r: float = positive(2.0)
    marginals_temp_c: float = positive(2.0)
    freeze_last_layer: int = at_least(1, 0)  # epochs during which last_layer and last_layer_c get no gradient
    # views (ref 224 px)
    global_size: int = at_least(64, 1)
    global_scale: tuple = ranged((0.25, 1.0), gt=0, le=1)
    jitter_strength: float = at_least(0.25, 0)  # colour jitter (0.4s, 0.4s, 0.2s, 0.1s), p 0.8; ref s = 1
    blur_ref_size: int = 224  # view blur σ scaled by crop side / this (CPU default); 0: σ in pixels (ref)

    def validate(self, where: str) -> None:
        if self.blur_ref_size < 0:
            raise BenchError(f"{where}.blur_ref_size: expected 0 (σ in pixels) or a positive crop side, "
                             f"got {self.blur_ref_size}")
        positive = ("out_dim", "out_dim_c", "hidden_dim", "bottleneck_dim", "teacher_temp", "warmup_teacher_temp",
                    "student_temp", "teacher_temp_c", "warmup_teacher_temp_c", "student_temp_c", "sinkhorn_lambda",
                    "sinkhorn_iterations", "marginals_temp_r", "marginals_temp_c", "global_size")
        for name in positive:
            if not getattr(self, name) > 0:
                raise BenchError(f"{where}.{name}: expected a positive number, got {getattr(self, name)!r}")
        if self.which_features not in ("q", "k", "v"):
            raise BenchError(f"{where}.which_features: expected one of q, k, v, got {self.which_features!r}")
        if self.jitter_strength < 0:
            raise BenchError(f"{where}.jitter_strength: expected a non-negative number, got {self.jitter_strength}")
        if self.lambda_pos < 0 or self.alpha_s < 0:
            raise BenchError(f"{where}: lambda_pos and alpha_s must be >= 0, got {self.lambda_pos}, {self.alpha_s}")
        if self.n_tokens < 2 or not 2 <= self.n_centroids_max <= self.n_tokens:
            raise BenchError(f"{where}: expected 2 <= n_centroids_max <= n_tokens, got n_centroids_max="
                             f"{self.n_centroids_max}, n_tokens={self.n_tokens}")
        for name in ("momentum_teacher", "center_momentum", "center_momentum_c"):
            if not 0 <= getattr(self, name) <= 1:
                raise BenchError(f"{where}.{name}: expected a value in [0, 1], got {getattr(self, name)}")
        lo, hi = self.global_scale
        if not 0 < lo <= hi <= 1:
            raise BenchError(f"{where}.global_scale: expected 0 < min <= max <= 1, got {self.global_scale!r}")


class CrOCPair(nn.Module):
    """A ViT backbone and its two-output head (student or teacher)."""

    def __init__(self, backbone, head: DINOHead):
        super().__init__()
        self.backbone = backbone
        self.head = head


def _rename_loss_centres(state_dict, prefix, *args) -> None:
    """Checkpoints written before the loss became one module keep their centres as ``loss_image.center`` and
    ``loss_object.center``; they load into ``loss_fn.image`` / ``loss_fn.object``."""
    for old, new in (("loss_image.", "loss_fn.image."), ("loss_object.", "loss_fn.object.")):
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


@METHODS.register("croc")
class CrOC(SelfDistillationHooks, Method):
    config_class = CrOCConfig
    pretrain_defaults = {"optimizer": "adamw", "lr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4,
                         "clip_grad": 3.0, "epochs": 4}

    def __init__(self, cfg: CrOCConfig, backbone_factory, schedule: Schedule):
        super().__init__(cfg, backbone_factory, schedule)
        backbone = backbone_factory()
        if not backbone.is_vit:
            raise BenchError(f"backbone {backbone.name}: croc needs a ViT backbone (it clusters attention keys)")
        self.n_heads = last_block_attention(backbone.model).num_heads
        head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                        use_bn=cfg.use_bn_in_head, norm_last_layer=cfg.norm_last_layer, out_dim_c=cfg.out_dim_c)
        self.student = CrOCPair(backbone, head)
        self.teacher = make_teacher(self.student)
        self.loss_fn = CrOCLoss(cfg, schedule.epochs)
        self._register_load_state_dict_pre_hook(_rename_loss_centres)
        self.ema = EMASchedule(cfg.momentum_teacher, schedule.total_steps)
        # Drawn from the global generator, which the loop seeds identically on every worker before building.
        self.noise_seed = int(torch.randint(0, 2**31 - 1, ()))

    def view_spec(self) -> MultiCropSpec:
        c = self.cfg
        # Two independent crops (the reference calls its spatial transform twice), no local crops.
        return MultiCropSpec(n_global=2, global_size=c.global_size, global_scale=tuple(c.global_scale), n_local=0,
                             blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2, 0.0), same_box_for_globals=False,
                             jitter=scaled_jitter(BYOL_JITTER, c.jitter_strength), blur_ref_size=c.blur_ref_size)

    # ------------------------------------------------------------------------------------------ helpers
    def _positions(self, batch: dict, grid: tuple[int, int], device) -> torch.Tensor:
        """B×2×N×2 patch centres (x, y) in source-image pixels, tokens in row-major order."""
        boxes, flips = batch["boxes"], batch["flips"]
        per_view = [cell_centers(boxes[:, v], flips[:, v], grid).flatten(1, 2) for v in range(2)]
        return torch.stack(per_view, dim=1).to(device)

    def _seed_noise(self, batch: dict, step: int, bsz: int, n_joint: int, device) -> torch.Tensor:
        """P×2N uniform noise for the seed draw, a function of (run, step, sample index) only."""
        index = batch.get("index")
        ids = index.tolist() if isinstance(index, torch.Tensor) else list(range(bsz))
        rows = []
        for i in ids:
            g = torch.Generator().manual_seed(((self.noise_seed * 1_000_003 + step) * 10_000_019 + int(i)) % 2**63)
            rows.append(torch.rand(self.n_heads, n_joint, generator=g))
        return torch.cat(rows).to(device)

    @torch.no_grad()
    def cluster(self, batch: dict, step: int, x: torch.Tensor) -> tuple[torch.Tensor, ClusterResult, tuple, tuple]:
        """The teacher's side: (its [CLS] logits 2B×out_dim, clusters, its centroids per view, token layout).

        x is 2B×3×s×s (view 1 then view 2); the layout is (prefix tokens, N patch tokens per view)."""
        c = self.cfg
        bsz, h = x.shape[0] // 2, self.n_heads
        t_tokens, t_feats = tokens_and_head_features(self.teacher.backbone, x, c.which_features)
        t_logits = self.teacher.head(t_tokens[:, 0])
        prefix = getattr(self.teacher.backbone.model, "num_prefix_tokens", 1)  # [CLS] is token 0
        n = t_tokens.shape[1] - prefix
        stride = self.teacher.backbone.stride
        grid = (x.shape[-2] // stride, x.shape[-1] // stride)
        if grid[0] * grid[1] != n:
            raise BenchError(f"methods.croc.global_size: {x.shape[-1]} px does not give a whole patch grid "
                             f"(patch {stride}); use a multiple of {stride}")
        with torch.autocast(x.device.type, enabled=False):
            # (2B)×h×T×d -> P×2×N×d with problem p = image·h + head
            feats = t_feats.float().view(2, bsz, h, *t_feats.shape[2:]).permute(1, 2, 0, 3, 4)
            feats = feats.reshape(bsz * h, 2, *t_feats.shape[2:])
            positions = self._positions(batch, grid, x.device).repeat_interleave(h, dim=0)  # P×2×N×2
            noise = self._seed_noise(batch, step, bsz, 2 * n, x.device)
            clusters = cluster_views(
                feats[:, :, prefix:], feats[:, :, 0], positions, noise, n_seeds=c.n_tokens,
                k_max=c.n_centroids_max, lambda_pos=c.lambda_pos, sinkhorn_lambda=c.sinkhorn_lambda,
                sinkhorn_iterations=c.sinkhorn_iterations, temp_r=c.marginals_temp_r, temp_c=c.marginals_temp_c,
                uniform_marginals=c.uniform_marginals)
            t_patches = t_tokens[:, prefix:].float().view(2, bsz, n, -1)
            t_scale = global_mean(t_tokens[:, 0].float().norm(dim=-1))
            t_cents = view_centroids(t_patches, clusters.weights, clusters.valid, t_scale)
        return t_logits, clusters, t_cents, (prefix, n)

    def object_logits(self, s_tokens: torch.Tensor, clusters: ClusterResult, t_cents: tuple, layout: tuple
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Student / teacher centroid logits 2n×out_dim_c: the teacher's assignments pool the student's tokens;
        gradients flow through them and through the student's mean [CLS] norm."""
        prefix, n = layout
        bsz = s_tokens.shape[0] // 2
        s_scale = global_mean(s_tokens[:, 0].norm(dim=-1))
        s_c1, s_c2 = view_centroids(s_tokens[:, prefix:].reshape(2, bsz, n, -1), clusters.weights, clusters.valid,
                                    s_scale)
        with torch.no_grad():
            t_out = self.teacher.head.forward_c(torch.cat(list(t_cents)))
        return self.student.head.forward_c(torch.cat([s_c1, s_c2])), t_out

    def training_step(self, batch: dict, step: int) -> dict:
        x = torch.cat(batch["views"][:2])
        epoch = step // max(self.schedule.steps_per_epoch, 1)
        t_logits, clusters, t_cents, layout = self.cluster(batch, step, x)
        s_tokens = self.student.backbone.model.forward_features(x)
        s_logits = self.student.head(s_tokens[:, 0])
        n_local = t_cents[0].shape[0]
        n_global = int(global_count(n_local, x.device))
        objects = self.object_logits(s_tokens, clusters, t_cents, layout) if n_global > 0 else None
        loss, logs = self.loss_fn(s_logits, t_logits, objects, n_local, n_global, epoch)
        return {"loss": loss, **logs, "clusters": float(clusters.n_clusters.float().mean()),
                "valid_per_image": n_local / (x.shape[0] // 2), "momentum": self.ema.momentum(step)}

    @classmethod
    def search_space(cls) -> dict:
        from ray import tune

        return {
            "lambda_pos": tune.uniform(0.0, 8.0),
            "teacher_temp": tune.uniform(0.02, 0.07),
            "teacher_temp_c": tune.uniform(0.02, 0.07),
            "student_temp": tune.uniform(0.05, 0.2),
            "student_temp_c": tune.uniform(0.05, 0.2),
            # K range and seeds: every combination keeps 2 <= n_centroids_max <= n_tokens
            "n_centroids_max": tune.choice([2, 3, 4]),
            "n_tokens": tune.choice([4, 5, 6, 8]),
            "sinkhorn_lambda": tune.loguniform(5.0, 50.0),
        }
