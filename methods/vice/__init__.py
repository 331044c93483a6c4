"""ViCE (Karlsson et al., arXiv 2111.12460): superpixel-level swapped cluster assignment.

VISSL's ``DenseSwAVCriterion`` where it and the paper differ (``shared/specs/methods.md`` §0.1, §1): contextual
square views with SLIC superpixel maps shared by every view (``views.py``, recipe ``superpixel_views``); a trunk
giving a dense 128-d map (``trunk.py``: the light CPU decoder or the reference's dilated ResNet + ASPP +
DeepLabV3+), L2-normalised per pixel and scored against unit-norm prototypes (no projection MLP); region pooling,
Sinkhorn codes of view 0 with a queue, swapped prediction and the coherence term in :class:`ViCELoss` (``loss.py``).
Prototype gradients are dropped for the first ``freeze_prototypes_iters`` iterations and their rows re-normalised
after every update. Evaluation: the decoder's map, L2-normalised per pixel; no superpixels. Why the CPU default
deviates (ε 0.02, ``fuse_convs=0``, jitter, sizes) with the measurements: ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from bench.data.views import SWAV_JITTER, scaled_jitter
from bench.errors import BenchError
from bench.ranges import at_least, fraction, positive
from bench.registry import METHODS
from methods.base import Method, Schedule, split_decay
from methods.common.prototypes import Prototypes
from methods.common.sinkhorn import EmbeddingQueue
from methods.vice.loss import ViCELoss
from methods.vice.regions import downsample_labels
from methods.vice.trunk import TRUNKS, DenseTrunk, upsample_to_stride  # noqa: F401  (re-exported)
from methods.vice.views import SuperpixelViews, SuperpixelViewSpec  # noqa: F401


@dataclass
class ViCEConfig:
    # ---- views (views.py)
    n_views: int = at_least(3, 2)  # ref 5
    view_size: int = at_least(64, 1)  # ref 400
    resize_range: tuple = positive((0.5, 1.5))
    min_img_size: int = at_least(96, 1)  # ref 500 (std image side)
    region_size: int = at_least(8, 2)  # SLIC region size in px; ref 20 on 400-500 px images
    ruler: float = positive(10.0)  # SLIC compactness
    slic_iters: int = at_least(5, 1)
    regular_grid: bool = False  # ablation: square cells instead of SLIC
    mask_views: bool = True
    preserve_ratio: float = fraction(0.25)
    mask_intensity: float = fraction(0.25)
    flip_p: float = fraction(0.5)
    jitter_strength: float = at_least(0.25, 0)  # colour jitter (0.8s, 0.8s, 0.8s, 0.2s), p 0.8; ref s = 1
    blur_ref_size: int = at_least(400, 0)  # blur σ scaled by view_size / this; 0: σ in pixels (ref)
    # ---- model
    trunk: str = "light"  # light (CPU default) | deeplabv3plus (ref: dilated ResNet OS8 + ASPP + DeepLabV3+, SyncBN)
    aspp_rates: tuple = (12, 24, 36)  # deeplabv3plus only; ref 12/24/36 at output stride 8
    embed_dim: int = at_least(128, 1)  # OUT_FEAT_DIM
    decoder_dim: int = at_least(128, 1)  # ref 256 (DECODER_CH)
    low_level_dim: int = at_least(48, 1)
    fuse_convs: int = at_least(0, 0)  # separable 3×3 convs after the concatenation (ref 2; see docs/methods.md)
    decoder_norm: str = "gn"  # gn | bn (ref SyncBN)
    train_stride: int = 2  # pixels per cell of the map the loss sees; ref 1 (input resolution)
    eval_stride: int = 4  # pixels per cell of dense_features; ref 1
    n_prototypes: int = at_least(128, 2)  # ref 128 (COCO DeepLab), 27 (FPN)
    pooling: str = "representative"  # representative (ref COCO DeepLab) | mean (ref FPN)
    # ---- loss
    temperature: float = positive(0.1)
    epsilon: float = positive(0.02)  # ref 0.05 (docs/methods.md, "From random init")
    sinkhorn_iters: int = at_least(3, 1)
    hard_assignment_iters: int = at_least(0, 0)  # one-hot (argmax) codes for the first N iterations (temp_hard_assignment_iters)
    coherence_weight: float = at_least(1.0, 0)
    swav_weight: float = at_least(1.0, 0)
    # ---- prototypes and queue
    freeze_prototypes_iters: int = at_least(313, 0)  # ref 313: longer than the CPU default run, so its prototypes stay fixed
    queue_length: int = at_least(3072, 0)  # global, split over workers; ref 160000; 0 disables
    queue_start_iter: int = at_least(5, 0)  # ref 313

    def validate(self, where: str) -> None:
        if self.pooling not in ("representative", "mean"):
            raise BenchError(f"{where}.pooling: expected representative or mean, got '{self.pooling}'")
        if self.trunk not in ("light", "deeplabv3plus"):
            raise BenchError(f"{where}.trunk: expected light or deeplabv3plus, got '{self.trunk}'")
        if self.trunk == "deeplabv3plus" and (not self.aspp_rates or min(self.aspp_rates) < 1):
            raise BenchError(f"{where}.aspp_rates: expected positive dilation rates, got {self.aspp_rates}")
        if self.decoder_norm not in ("gn", "bn"):
            raise BenchError(f"{where}.decoder_norm: expected gn or bn, got '{self.decoder_norm}'")
        for name in ("train_stride", "eval_stride"):
            if getattr(self, name) not in (1, 2, 4):
                raise BenchError(f"{where}.{name}: expected 1, 2 or 4, got {getattr(self, name)}")
        if self.n_views < 2:
            raise BenchError(f"{where}.n_views: expected at least 2 views, got {self.n_views}")
        if self.n_prototypes < 2 or self.embed_dim < 2:
            raise BenchError(f"{where}: n_prototypes and embed_dim must be at least 2")
        if self.temperature <= 0 or self.epsilon <= 0 or self.sinkhorn_iters < 1:
            raise BenchError(f"{where}: temperature and epsilon must be positive, sinkhorn_iters at least 1")
        if self.fuse_convs < 0:
            raise BenchError(f"{where}.fuse_convs: expected 0 or more separable convs, got {self.fuse_convs}")
        if self.jitter_strength < 0:
            raise BenchError(f"{where}.jitter_strength: expected a non-negative number, got {self.jitter_strength}")
        if self.queue_length < 0 or self.region_size < 1:
            raise BenchError(f"{where}: queue_length must be >= 0 and region_size >= 1")


@METHODS.register("vice")
class ViCE(Method):
    config_class = ViCEConfig
    # ref: LARC-SGD lr 0.32 / 128 images, wd 1e-6, 12 epochs (see docs/methods.md for the CPU choice)
    pretrain_defaults = {"optimizer": "adamw", "lr": 1e-4, "min_lr": 1e-5, "warmup_epochs": 0.2, "epochs": 2,
                         "weight_decay": 1e-6, "weight_decay_end": 1e-6, "clip_grad": 3.0}

    def __init__(self, cfg: ViCEConfig, backbone_factory, schedule: Schedule):
        super().__init__(cfg, backbone_factory, schedule)
        backbone = backbone_factory()
        unit = 4 * max(cfg.train_stride, cfg.eval_stride)
        if cfg.view_size % backbone.stride or cfg.view_size % unit:
            raise BenchError(f"methods.vice.view_size: {cfg.view_size} must be a multiple of the backbone stride "
                             f"{backbone.stride} and of {unit}")
        self.trunk = TRUNKS[cfg.trunk](backbone, cfg)
        self.prototypes = Prototypes(cfg.embed_dim, cfg.n_prototypes)
        self.loss_fn = ViCELoss(cfg.pooling, cfg.temperature, cfg.epsilon, cfg.sinkhorn_iters, cfg.coherence_weight,
                                cfg.swav_weight)
        # BatchNorm in the trunk (the reference trunk, or decoder_norm=bn) normalises over the global batch: SyncBN
        self.sync_bn = cfg.trunk == "deeplabv3plus" or cfg.decoder_norm == "bn"
        local_len = cfg.queue_length // max(schedule.world_size, 1)
        self.queue = EmbeddingQueue(local_len, cfg.embed_dim, init="uniform") if local_len > 0 else None
        # each worker keeps its own queue: DDP must not broadcast rank 0's over it
        self._ddp_params_and_buffers_to_ignore = ["queue.items", "queue.pushed"] if self.queue is not None else []

    # ---- data
    def view_spec(self) -> SuperpixelViewSpec:
        c = self.cfg
        return SuperpixelViewSpec(n_views=c.n_views, view_size=c.view_size, resize_range=tuple(c.resize_range),
                                  min_img_size=c.min_img_size, region_size=c.region_size, ruler=c.ruler,
                                  slic_iters=c.slic_iters, regular_grid=c.regular_grid, mask=c.mask_views,
                                  preserve_ratio=c.preserve_ratio, mask_intensity=c.mask_intensity, flip_p=c.flip_p,
                                  jitter=scaled_jitter(SWAV_JITTER, c.jitter_strength),
                                  blur_ref_size=c.blur_ref_size)

    # ---- training
    def training_step(self, batch: dict, step: int) -> dict:
        c = self.cfg
        views = batch["views"]
        n_views, b, side = len(views), views[0].shape[0], views[0].shape[-1]
        feat = upsample_to_stride(self.trunk(torch.cat(views)), side, c.train_stride)
        labels = [downsample_labels(sp, c.train_stride) for sp in batch["superpixels"]]
        use_queue = self.queue is not None and step >= c.queue_start_iter
        q_scores = self.queue.scores(self.prototypes.weight) if use_queue else None
        loss, pooled, codes, logs = self.loss_fn(list(feat.float().chunk(n_views)), labels, self.prototypes.weight,
                                                 q_scores, hard=step < c.hard_assignment_iters)
        emb0 = pooled["emb"]
        if use_queue:
            self.queue.push(emb0)
        with torch.no_grad():  # collapse diagnostics: share of prototypes that win a region, mean cosine
            used = torch.unique(codes.argmax(dim=1)).numel() / c.n_prototypes if codes.numel() else 0.0
            cos = float((emb0 @ emb0.t()).mean()) if emb0 is not None and emb0.numel() else 0.0
        return {"loss": loss, **logs, "regions_per_image": pooled["image"].numel() / max(b, 1),
                "prototypes_used": used, "embedding_cos": cos, "queue_used": float(use_queue)}

    def on_after_backward(self, step: int) -> None:
        if step < self.cfg.freeze_prototypes_iters:
            self.prototypes.weight.grad = None

    def after_step(self, step: int) -> None:
        self.prototypes.normalize_()

    def param_groups(self) -> list[dict]:
        return split_decay(self.named_parameters())

    # ---- evaluation
    def eval_backbone(self):
        return self.trunk.backbone

    @torch.no_grad()
    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """B×3×H×W -> B×128×(H/eval_stride)×(W/eval_stride), L2-normalised per cell (H, W multiples of 4·patch)."""
        feat = self.trunk(images)
        side_h, side_w = images.shape[-2] // self.cfg.eval_stride, images.shape[-1] // self.cfg.eval_stride
        if feat.shape[-2:] != (side_h, side_w):
            feat = F.interpolate(feat, size=(side_h, side_w), mode="bilinear", align_corners=False)
        return F.normalize(feat.float(), dim=1)

    @classmethod
    def search_space(cls) -> dict:
        from ray import tune

        return {
            "temperature": tune.loguniform(0.05, 0.3),
            "epsilon": tune.loguniform(0.01, 0.1),
            "n_prototypes": tune.choice([32, 64, 128, 256]),
            "queue_length": tune.choice([0, 1024, 3072, 8192]),
            "region_size": tune.choice([6, 8, 12]),
            "coherence_weight": tune.uniform(0.25, 2.0),
        }
