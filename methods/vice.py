"""ViCE (Karlsson et al., arXiv 2111.12460): superpixel-level swapped cluster assignment.

Faithful to ``shared/specs/methods.md`` §0.1 and §1 (the code, VISSL ``DenseSwAVCriterion``, where it and the paper
differ):

* views: ``bench/data/superpixels.py`` (recipe ``superpixel_views``): V contextual square views around an
  edge-sampled centre, SLIC superpixel maps whose ids are shared by every view (−1 = ignore), regional noise masking,
  flips; superpixels exist only in the training pipeline;
* a trunk giving a dense 128-d map, L2-normalised per pixel and scored against K prototypes (``Linear(128, K)``,
  no projection MLP: ``USE_IDENTITY``); prototype rows are re-normalised after every update and their gradients are
  dropped for the first ``freeze_prototypes_iters`` iterations;
* region pooling, per view and image, over the common superpixels (``methods/common/regions.py``, scatter ops):
  *representative* mode (default, COCO DeepLab configs): the pixel with the highest max-prototype score represents
  the region, ``e = stopgrad(z̄_{i*})``, ``σ = C z̄_{i*}`` (only that pixel gets the swap gradient), plus the coherence
  loss ``mean_{v,b} mean_r mean_{i∈r} ‖z̄_i − e_r + 1e-6‖``; *mean* mode (FPN configs): ``σ = C·normalise(mean_r z)``
  over ids > 0 (the reference drops id 0 in this mode), no coherence term;
* rows align across views by (image, id), the reference's ascending-id order;
* Sinkhorn (ε 0.05, CPU default 0.02; 3 iterations, distributed) on **view 0 only** (+ the queue's rows, scored
  with the current prototypes); views 1…V−1 predict those codes: ``L_swav = 1/(V−1) Σ_v mean_n −Σ_k q log softmax(σ_v/τ)``, τ 0.1;
  view 0's predictions get no loss; total ``(w_coh·L_coh + w_swav·L_swav)/2`` (representative) or ``L_swav`` (mean);
* queue (embeddings, not scores), initialised U(±1/√(D/3)), used and filled with view 0's region embeddings from
  ``queue_start_iter`` on (the reference uses it while it still holds its random initial rows).

Deviations (each a config field; reference values in the comments of :class:`ViCEConfig`):

* trunk: the reference is a dilated ResNet-50 (OS8) + DeepLabV3+ decoder with a per-pixel 128-d output, started from
  **supervised ImageNet weights**. Here the harness backbone (``backbone_factory()``, by default the tiny ViT with
  8-px patches, random init; ``--init`` loads a local checkpoint, e.g. supervised weights) feeds a light
  DeepLabV3+-style decoder: a 1×1 projection of the last map stands in for ASPP (dilations 12/24/36 are meaningless
  on an 8×8 token grid), a stride-4 low-level branch (a two-conv stem for ViTs, layer1 for ResNets) replaces
  layer1's 48-channel skip, depthwise-separable 3×3 convs (``fuse_convs``: ref 2, 0 on the CPU default, see below)
  and a 1×1 to 128 give a stride-4 map that is bilinearly upsampled to stride ``train_stride`` (ref 1, the input
  resolution) for the loss and ``eval_stride`` for evaluation; superpixel maps are sampled at the cell centres of
  that grid;
* GroupNorm instead of (Sync)BatchNorm in the decoder: on CPU workers SyncBN is unavailable and per-worker BN would
  make results depend on the worker count;
* loss means are taken over the global set of regions (counts all-reduced), so that N data-parallel workers give
  the single-process result even when workers hold different numbers of regions (the reference averages per GPU);
* sizes for the CPU: 3 views of 64 px (ref 5 of 400), SLIC region size 8 px on the 96-px synthetic images
  (ref 20 px on 400–500-px images), queue start after a few steps (ref 313), queue length scaled to about three
  batches of regions (ref 160000 global); the prototypes stay frozen for the reference's 313 iterations, which is
  longer than the CPU default run;
* colour jitter at a quarter of the reference strength (``jitter_strength=0.25``; ref 1: 0.8/0.8/0.8/0.2) and
  lr 1e-4: see "From random init" below;
* optimiser: AdamW with the harness's cosine schedule (ref LARC-SGD lr 0.32 for 128 images, wd 1e-6): LARC's
  trust ratio is tuned for fine-tuning supervised weights and barely moves a randomly initialised trunk in a few
  hundred steps (``--set pretrain.optimizer=lars`` gives the reference's form).

Evaluation (``dense_features``): the decoder's 128-d map, L2-normalised per pixel, as the reference's
``DenseSwAVModule``; no superpixels.

From random init (measured on the synthetic default, 96 steps, lr 1e-4, linseg mIoU; the backbone's random-init
row is 53.60). Two deviations make ViCE learn here, both config fields:

* ``epsilon=0.02`` (ref 0.05). At 0.05 the Sinkhorn codes of a random network's regions are nearly uniform (entropy
  4.8 of ln 128 = 4.85) and the swapped prediction collapses within 20–50 steps: region embeddings' mean cosine
  → 0.99, loss → ln K. That happened under every other setting tried (lr 1e-3 23.8; 3e-4 with prototypes frozen
  48 steps 34.2; mean pooling 33.9; no jitter or masking 32.6; 128 → 32 prototypes without queue; a CLoVE-trained
  init). At 0.02 the codes carry information (entropy 3.5–3.9), the embeddings stay apart (cosine 0.80 → 0.73)
  and the loss falls: with the reference decoder ViCE rises from its untrained 32.72 to 47.89. The number of
  Sinkhorn iterations does not matter here (3: 61.68, 10: 61.75).
* ``fuse_convs=0`` (ref 2 separable 3×3 convs after the concatenation). The *untrained* decoder's map scores 32.72
  with the two convs (the concatenated branches before them: 65.54), so ViCE started 21 points below the
  random-init row, which evaluates the backbone and has no decoder; a CPU run is too short for those convs to
  learn what they destroy. Without them the untrained map scores 59.82 and ViCE trains it to 61.68.

Also on the CPU default: lr 1e-4, prototypes fixed for the reference's 313 iterations and jitter 0.25, which slowed
the collapse before the ε change (37.6). Why a random network needs all this: the centred cosine between two views'
features of the same superpixel is −0.17 at the reference jitter, +0.04 at 0.25 and +0.20 without jitter or
masking (their pixel means correlate at 0.96 without jitter, so the geometry is right). The reference avoids the
regime by starting from supervised ImageNet weights (``--init``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from bench.data.superpixels import SuperpixelViewSpec
from bench.data.views import SWAV_JITTER, scaled_jitter
from bench.errors import BenchError
from bench.ranges import at_least, fraction, positive
from bench.registry import METHODS
from methods.base import Method, Schedule, split_decay
from methods.common.dist import all_reduce_sum, world_size
from methods.common.regions import align_regions, downsample_labels, segment_argmax, segment_mean
from methods.common.sinkhorn import EmbeddingQueue, swav_codes


@dataclass
class ViCEConfig:
    # ---- views (bench/data/superpixels.py)
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
    blur_ref_size: int = at_least(400, 1)  # blur σ scaled by view_size / this
    # ---- model
    embed_dim: int = at_least(128, 1)  # OUT_FEAT_DIM
    decoder_dim: int = at_least(128, 1)  # ref 256 (DECODER_CH)
    low_level_dim: int = at_least(48, 1)
    fuse_convs: int = at_least(0, 0)  # separable 3×3 convs after the concatenation (ref 2; see the module docstring)
    decoder_norm: str = "gn"  # gn | bn (ref SyncBN)
    train_stride: int = 2  # pixels per cell of the map the loss sees; ref 1 (input resolution)
    eval_stride: int = 4  # pixels per cell of dense_features; ref 1
    n_prototypes: int = at_least(128, 2)  # ref 128 (COCO DeepLab), 27 (FPN)
    pooling: str = "representative"  # representative (ref COCO DeepLab) | mean (ref FPN)
    # ---- loss
    temperature: float = positive(0.1)
    epsilon: float = positive(0.02)  # ref 0.05 (see "From random init" in the module docstring)
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


def _norm(kind: str, ch: int) -> nn.Module:
    return nn.GroupNorm(min(8, ch), ch) if kind == "gn" else nn.BatchNorm2d(ch)


class SepConv(nn.Module):
    """Depthwise 3×3 → ReLU → norm → pointwise 1×1 → ReLU → norm (the reference's order: ReLU before BN)."""

    def __init__(self, cin: int, cout: int, norm: str):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.n1 = _norm(norm, cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.n2 = _norm(norm, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.n2(F.relu(self.pw(self.n1(F.relu(self.dw(x))))))


class DenseTrunk(nn.Module):
    """Backbone + light DeepLabV3+-style decoder: B×3×H×W -> B×embed_dim×(H/4)×(W/4), not normalised."""

    def __init__(self, backbone, cfg: ViCEConfig):
        super().__init__()
        self.backbone = backbone
        norm = cfg.decoder_norm
        if backbone.is_vit:
            # stride-4 low-level features for a patch-8/16 ViT, in place of ResNet layer1
            self.stem = nn.Sequential(
                nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False), _norm(norm, 32), nn.ReLU(inplace=True),
                nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False), _norm(norm, 64), nn.ReLU(inplace=True))
            low_in = 64
        else:
            self.stem = None
            low_in = backbone.model.feature_info[1]["num_chs"]  # layer1 (stride 4)
        self.high = nn.Sequential(nn.Conv2d(backbone.embed_dim, cfg.decoder_dim, 1, bias=False),
                                  _norm(norm, cfg.decoder_dim), nn.ReLU(inplace=True))
        self.low = nn.Sequential(nn.Conv2d(low_in, cfg.low_level_dim, 1, bias=False),
                                 _norm(norm, cfg.low_level_dim), nn.ReLU(inplace=True))
        cat_dim = cfg.decoder_dim + cfg.low_level_dim
        self.fuse = nn.Sequential(*[SepConv(cat_dim if i == 0 else cfg.decoder_dim, cfg.decoder_dim, norm)
                                    for i in range(cfg.fuse_convs)])
        self.out = nn.Conv2d(cfg.decoder_dim if cfg.fuse_convs else cat_dim, cfg.embed_dim, 1)
        for mod in [self.high, self.low, self.fuse, self.out] + ([self.stem] if self.stem is not None else []):
            for m in mod.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                    nn.init.ones_(m.weight)
                    nn.init.constant_(m.bias, 1e-4)  # the reference's BN bias init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            low = self.stem(x)
            high = self.backbone.forward_dense(x)
        else:
            stages = self.backbone.forward_stages(x)
            low, high = stages[0], stages[-1]
        high = F.interpolate(self.high(high), size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.out(self.fuse(torch.cat([high, self.low(low)], dim=1)))


def upsample_to_stride(feat: torch.Tensor, image_side: int, stride: int) -> torch.Tensor:
    """Stride-4 map -> bilinear map at ``stride`` pixels per cell (identity for stride 4)."""
    side = image_side // stride
    if feat.shape[-1] == side and feat.shape[-2] == side:
        return feat
    return F.interpolate(feat, size=(side, side), mode="bilinear", align_corners=False)


def _global_mean(total: torch.Tensor, count: float, device) -> tuple[torch.Tensor, float]:
    """total / (count summed over workers), times the world size because DDP averages gradients."""
    n = float(all_reduce_sum(torch.tensor([float(count)], device=device)).item())
    return total * world_size() / max(n, 1.0), n


@METHODS.register("vice")
class ViCE(Method):
    config_class = ViCEConfig
    # ref: LARC-SGD lr 0.32 / 128 images, wd 1e-6, 12 epochs (see the module docstring for the CPU choice)
    pretrain_defaults = {"optimizer": "adamw", "lr": 1e-4, "min_lr": 1e-5, "warmup_epochs": 0.2, "epochs": 2,
                         "weight_decay": 1e-6, "weight_decay_end": 1e-6, "clip_grad": 3.0}

    def __init__(self, cfg: ViCEConfig, backbone_factory, schedule: Schedule):
        super().__init__(cfg, backbone_factory, schedule)
        backbone = backbone_factory()
        unit = 4 * max(cfg.train_stride, cfg.eval_stride)
        if cfg.view_size % backbone.stride or cfg.view_size % unit:
            raise BenchError(f"methods.vice.view_size: {cfg.view_size} must be a multiple of the backbone stride "
                             f"{backbone.stride} and of {unit}")
        self.trunk = DenseTrunk(backbone, cfg)
        self.prototypes = nn.Linear(cfg.embed_dim, cfg.n_prototypes, bias=False)
        self.normalize_prototypes()
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

    # ---- model pieces
    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def pool_views(self, feats: list[torch.Tensor], labels: list[torch.Tensor]) -> dict:
        """Per-view region pooling.

        feats: V × (B×D×h×w) un-normalised maps; labels: V × (B×h×w) ids (−1 ignore). Returns ``sigma`` V×R×K scores,
        ``emb`` R×D view-0 embeddings (detached, for the queue), ``present`` V×R bool, ``image`` R, ``coh_sum``
        (sum over (view, image) pairs of the per-pair coherence) and ``coh_pairs`` (their number).
        """
        c = self.cfg
        b = labels[0].shape[0]
        rep = c.pooling == "representative"
        index, image, _ = align_regions([lab.reshape(b, -1) for lab in labels], ref=0, min_id=0 if rep else 1)
        r = image.numel()
        protos = self.prototypes.weight
        sigmas, presents, emb0 = [], [], None
        coh_sum = feats[0].new_zeros(())
        coh_pairs = 0
        for v, (feat, idx) in enumerate(zip(feats, index)):
            z = feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])  # (B·h·w)×D
            if rep:
                zn = F.normalize(z, dim=-1)
                with torch.no_grad():
                    best = (zn @ protos.t()).amax(dim=-1)
                pos = segment_argmax(best, idx, r)
                present = pos >= 0
                z_rep = zn[pos.clamp_min(0)]
                e = z_rep.detach()
                sigma = z_rep @ protos.t()
                keep = idx >= 0
                d = torch.linalg.vector_norm(zn[keep] - e[idx[keep]] + 1e-6, dim=-1)  # PairwiseDistance
                per_region, _ = segment_mean(d, idx[keep], r)
                per_image, n_regions = segment_mean(per_region[present], image[present], b)
                coh_sum = coh_sum + per_image[n_regions > 0].sum()
                coh_pairs += int((n_regions > 0).sum())
            else:
                mean, cnt = segment_mean(z, idx, r)
                present = cnt > 0
                e = F.normalize(mean, dim=-1)
                sigma = e @ protos.t()
                e = e.detach()
            if v == 0:
                emb0 = e
            sigmas.append(sigma)
            presents.append(present)
        return {"sigma": torch.stack(sigmas) if sigmas else None, "present": torch.stack(presents), "emb": emb0,
                "image": image, "coh_sum": coh_sum, "coh_pairs": coh_pairs}

    def swap_loss(self, sigma: torch.Tensor, present: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, list]:
        """sigma V×R×K, present V×R, codes R×K (from view 0) -> (sum over views 1.. of per-view global means, counts)."""
        c = self.cfg
        total = sigma.new_zeros(())
        counts = []
        for v in range(1, sigma.shape[0]):
            logp = F.log_softmax(sigma[v].float() / c.temperature, dim=-1)
            ce = -(codes * logp).sum(dim=-1)
            pv = present[v] & present[0]
            mean_v, n_v = _global_mean(ce[pv].sum(), int(pv.sum()), sigma.device)
            total = total + mean_v
            counts.append(n_v)
        return total / max(sigma.shape[0] - 1, 1), counts

    # ---- training
    def training_step(self, batch: dict, step: int) -> dict:
        c = self.cfg
        views = batch["views"]
        n_views, b, side = len(views), views[0].shape[0], views[0].shape[-1]
        feat = upsample_to_stride(self.trunk(torch.cat(views)), side, c.train_stride)
        feats = list(feat.float().chunk(n_views))
        labels = [downsample_labels(sp, c.train_stride) for sp in batch["superpixels"]]
        pooled = self.pool_views(feats, labels)
        sigma, present = pooled["sigma"], pooled["present"]

        use_queue = self.queue is not None and step >= c.queue_start_iter
        with torch.no_grad():
            q_scores = self.queue.scores(self.prototypes.weight) if use_queue else None
            codes = swav_codes(sigma[0].detach(), q_scores, c.epsilon, c.sinkhorn_iters)
            ent = -(codes * codes.clamp_min(1e-12).log()).sum(-1).mean() if codes.numel() else torch.zeros(())
            if step < c.hard_assignment_iters and codes.numel():
                codes = F.one_hot(codes.argmax(dim=1), codes.shape[1]).to(codes.dtype)
        l_swav, _ = self.swap_loss(sigma, present, codes)
        # keeps every parameter in the graph when this worker holds no region (DDP needs a backward)
        anchor = 0.0 * feat.mean()
        if c.pooling == "representative":
            l_coh, _ = _global_mean(pooled["coh_sum"], pooled["coh_pairs"], feat.device)
            loss = (c.coherence_weight * l_coh + c.swav_weight * l_swav) / 2 + anchor
        else:
            l_coh = torch.zeros(())
            loss = c.swav_weight * l_swav + anchor
        if use_queue:
            self.queue.push(pooled["emb"])
        with torch.no_grad():  # collapse diagnostics: share of prototypes that win a region, mean cosine
            emb0 = pooled["emb"]
            used = torch.unique(codes.argmax(dim=1)).numel() / c.n_prototypes if codes.numel() else 0.0
            cos = float((emb0 @ emb0.t()).mean()) if emb0 is not None and emb0.numel() else 0.0
        return {"loss": loss, "loss_swav": float(l_swav.detach()), "loss_coh": float(l_coh.detach()),
                "regions_per_image": pooled["image"].numel() / max(b, 1), "code_entropy": float(ent),
                "prototypes_used": used, "embedding_cos": cos, "queue_used": float(use_queue)}

    def on_after_backward(self, step: int) -> None:
        if step < self.cfg.freeze_prototypes_iters:
            self.prototypes.weight.grad = None

    def after_step(self, step: int) -> None:
        self.normalize_prototypes()

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
