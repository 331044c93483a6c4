"""CrOC (Stegmüller, Lebailly et al., CVPR 2023): cross-view online clustering for dense visual representations.

Faithful to ``shared/specs/methods.md`` §3 (the authors' code, ``stegmuel/CrOC`` ``main_croc.py``):

* ViT student and EMA teacher (momentum cosine → 1 per iteration), one head with a shared DINO MLP and two
  weight-normalised output layers: ``last_layer`` for [CLS] and ``last_layer_c`` for centroids
  (``methods/common/heads.py`` ``DINOHead(out_dim_c=…)``).
* Two views, each its own RandomResizedCrop (scale (0.25, 1)) + flip; view 1 blur p 1.0, view 2 blur p 0.1 and
  solarise p 0.2; the teacher and the student see the **same** two tensors (the student differs only by its
  weights and drop-path).
* Teacher clustering per (image, head) over the joint tokens of both views on the last block's per-head keys,
  with positions in original-image pixels (patch centres from each view's box and flip: the reference averages
  a per-pixel position map over each patch, which for an axis-aligned crop is the patch centre):
  ``methods/common/clustering.py``. Defaults: 5 seeds, K* ∈ {2, 3, 4} by lowest transport cost,
  λ_pos = 4, Sinkhorn λ = 20 with 5 iterations, marginal temperatures 2 and 2.
* Losses: DINO on [CLS] (cross-view pairs only, centring 0.9, teacher temperature per epoch) plus α_s × the same
  loss on matched centroid pairs through ``last_layer_c`` with its own centre; both are
  ``methods/common/dino_loss.py`` ``DINOLoss`` (shared with ``dino``).
* AdamW, cosine lr and weight decay 0.04 → 0.4, per-tensor gradient clipping at 3.0, and the gradients of both
  ``last_layer`` and ``last_layer_c`` discarded during the first ``freeze_last_layer`` epochs.

Shapes for one step (B images, h heads, N = (s/patch)² tokens per view, C width, d = C/h, P = B·h problems):
views 2×(B×3×s×s) -> teacher tokens 2B×(1+N)×C and keys 2B×h×(1+N)×d -> problems P×2×N×d with positions
P×2×N×2 -> weights P×2×N×4 -> centroids n_valid×C per view (each image contributes up to h·K* pairs) ->
centroid logits 2·n_valid×out_dim_c.

Deviations (each also noted where it happens):

* CPU scale: 64-px views on the harness's tiny ViT (patch 8, 3 heads: 8×8 tokens per view; ref 224 px, ViT-S/16,
  6 heads), head widths 512/128 with out_dim 1024 and out_dim_c 256 (ref 2048/256, 65536 and 8192), teacher
  momentum 0.99 (ref 0.996, which leaves a few-hundred-step teacher near its initialisation), lr 5e-4 for batch 32
  with one warm-up epoch (ref 0.0005·B/256 with 10 of 300 epochs), 4 epochs of 48 steps by default (a CrOC step
  costs about 0.95 of a default DINO step, so this is ~2 minutes on 2 idle cores; ref 300 epochs), fp32 on CPU
  (ref fp16).
* Colour jitter at a quarter of the reference strength (``jitter_strength=0.25``; ref 1: brightness/contrast 0.4,
  saturation 0.2, hue 0.1). The synthetic default's scenes come in fixed grey tones, so the evaluation never
  tests photometric invariance, while full-strength jitter hides the views' correspondence from a random init.
  linseg mIoU after the default 4 epochs: 55.95 at 1, 57.38 at 0.25 (random-init 53.60).
* The student's drop-path is the harness's ``backbone.drop_path`` (default 0; ref 0.1); the teacher is kept in
  eval mode so it never drops paths, as in the reference where it is built without drop-path.
* Seeds are drawn with Gumbel top-k from per-sample noise seeded by (run, step, sample index) rather than
  ``torch.multinomial`` on the global generator: the same distribution, but reproducible on resume and
  independent of how the batch is split over workers.
* Data parallel only (one process is the reference): the cost's min–max normalisation, the mean [CLS] norm
  (differentiably) and the centroid loss's normalisation use all-reduced statistics (global min/max, global mean
  norm, global number of valid centroids), so W workers compute the loss and gradient one process computes on
  the global batch; the reference uses per-GPU values.
* Edge cases the reference crashes on (no valid centroid in the batch, B·h = 1) give a zero centroid loss here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.data.views import BYOL_JITTER, MultiCropSpec, scaled_jitter
from bench.errors import BenchError
from bench.ranges import at_least, momentum_value, positive, ranged
from bench.registry import METHODS
from methods.base import Method, Schedule, split_decay
from methods.common.clustering import cluster_views, global_mean, view_centroids
from methods.common.dino_loss import DINOLoss
from methods.common.dist import all_reduce_sum, world_size
from methods.common.ema import ema_update, make_teacher
from methods.common.geometry import cell_centers
from methods.common.heads import DINOHead
from methods.common.schedules import momentum_schedule
from methods.common.vit_tokens import last_block_attention, tokens_and_head_features


@torch.no_grad()
def _target_entropy(loss_fn: DINOLoss, teacher_logits: torch.Tensor, epoch: int) -> float:
    """Mean entropy of the centred, sharpened teacher targets (a collapse diagnostic)."""
    q = torch.softmax((teacher_logits.float() - loss_fn.center) / loss_fn.teacher_temp(epoch), dim=-1)
    return float(-(q * torch.log(q.clamp_min(1e-12))).sum(dim=-1).mean())


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

    def validate(self, where: str) -> None:
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


@METHODS.register("croc")
class CrOC(Method):
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
        self.teacher.eval()
        self.loss_image = DINOLoss(cfg.out_dim, cfg.teacher_temp, cfg.warmup_teacher_temp,
                                   cfg.warmup_teacher_temp_epochs, schedule.epochs, cfg.student_temp,
                                   cfg.center_momentum)
        self.loss_object = DINOLoss(cfg.out_dim_c, cfg.teacher_temp_c, cfg.warmup_teacher_temp_c,
                                    cfg.warmup_teacher_temp_epochs, schedule.epochs, cfg.student_temp_c,
                                    cfg.center_momentum_c)
        self.momentum = momentum_schedule(cfg.momentum_teacher, schedule.total_steps)
        # Drawn from the global generator, which the loop seeds identically on every worker before building.
        self.noise_seed = int(torch.randint(0, 2**31 - 1, ()))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the reference teacher has no drop-path
        return self

    def view_spec(self) -> MultiCropSpec:
        c = self.cfg
        # Two independent crops (the reference calls its spatial transform twice), no local crops.
        return MultiCropSpec(n_global=2, global_size=c.global_size, global_scale=tuple(c.global_scale), n_local=0,
                             blur_p=(1.0, 0.1, 0.5), solarize_p=(0.0, 0.2, 0.0), same_box_for_globals=False,
                             jitter=scaled_jitter(BYOL_JITTER, c.jitter_strength))

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

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict, step: int) -> dict:
        c = self.cfg
        v1, v2 = batch["views"][:2]
        bsz = v1.shape[0]
        x = torch.cat([v1, v2])
        epoch = step // max(self.schedule.steps_per_epoch, 1)
        h = self.n_heads
        with torch.no_grad():
            t_tokens, t_feats = tokens_and_head_features(self.teacher.backbone, x, c.which_features)
            t_logits = self.teacher.head(t_tokens[:, 0])
        prefix = getattr(self.teacher.backbone.model, "num_prefix_tokens", 1)  # [CLS] is token 0
        n = t_tokens.shape[1] - prefix
        stride = self.teacher.backbone.stride
        grid = (x.shape[-2] // stride, x.shape[-1] // stride)
        if grid[0] * grid[1] != n:
            raise BenchError(f"methods.croc.global_size: {x.shape[-1]} px does not give a whole patch grid "
                             f"(patch {stride}); use a multiple of {stride}")

        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
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
            t_c1, t_c2 = view_centroids(t_patches, clusters.weights, clusters.valid, t_scale)

        s_tokens = self.student.backbone.model.forward_features(x)
        s_logits = self.student.head(s_tokens[:, 0])
        entropy_image = _target_entropy(self.loss_image, t_logits, epoch)  # before the loss moves the centre
        loss_image = self.loss_image(list(s_logits.chunk(2)), list(t_logits.chunk(2)), epoch)

        # Object level: the teacher's assignments applied to the student's tokens; gradients flow through them
        # and through the student's mean [CLS] norm.
        n_local = t_c1.shape[0]
        n_global = int(all_reduce_sum(torch.tensor([float(n_local)], device=x.device)).item())
        loss_object = s_logits.new_zeros(())
        entropy_object = float("nan")
        if n_global > 0:
            s_scale = global_mean(s_tokens[:, 0].norm(dim=-1))
            s_c1, s_c2 = view_centroids(s_tokens[:, prefix:].reshape(2, bsz, n, -1), clusters.weights,
                                        clusters.valid, s_scale)
            with torch.no_grad():
                t_out = self.teacher.head.forward_c(torch.cat([t_c1, t_c2]))
            s_out = self.student.head.forward_c(torch.cat([s_c1, s_c2]))
            if n_local > 0:
                entropy_object = _target_entropy(self.loss_object, t_out, epoch)
                # the mean over this worker's pairs, rescaled so the workers' average is the mean over all pairs
                share = n_local * world_size() / n_global
                loss_object = self.loss_object(list(s_out.chunk(2)), list(t_out.chunk(2)), epoch) * share
            else:
                if self.training:
                    self.loss_object.update_center(t_out)  # joins the other workers' all-reduce
                loss_object = s_out.sum() * 0.0
        loss = loss_image + c.alpha_s * loss_object
        return {"loss": loss, "loss_image": float(loss_image.detach()), "loss_object": float(loss_object.detach()),
                "clusters": float(clusters.n_clusters.float().mean()), "valid_per_image": n_local / bsz,
                # the reference logs these too: targets near log(out_dim) mean a collapse to uniform
                "entropy_image": entropy_image, "entropy_object": entropy_object,
                "teacher_temp": self.loss_image.teacher_temp(epoch),
                "momentum": float(self.momentum[min(step, len(self.momentum) - 1)])}

    def on_after_backward(self, step: int) -> None:
        if step // max(self.schedule.steps_per_epoch, 1) < self.cfg.freeze_last_layer:
            for p in self.student.head.last_layer_params():
                p.grad = None

    def after_step(self, step: int) -> None:
        ema_update(self.teacher, self.student, float(self.momentum[min(step, len(self.momentum) - 1)]))

    def param_groups(self) -> list[dict]:
        return split_decay(self.student.named_parameters())

    def eval_backbone(self):
        return self.teacher.backbone

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
