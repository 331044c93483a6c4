"""Linear segmentation probe on frozen dense features (protocols.md §1, the Leopart protocol).

A 1×1 convolution (a per-pixel linear classifier) is trained with cross-entropy (ignore 255) on frozen
features bilinearly upsampled to the mask resolution; SGD momentum 0.9, weight decay 1e-4, StepLR ×0.1 at
``drop_at``. mIoU (percent, NaN-skip over classes) from one dataset-level confusion matrix.

Implementation note: the head is linear and bilinear upsampling is linear, so applying the 1×1 conv on the
token grid and upsampling the logits equals upsampling the features and then applying the conv (the
reference order), at a fraction of the memory. Without augmentation (``augment=false``, the synthetic
preset) the frozen features are computed once and cached; with it (the ``leopart`` preset: random resized
crop scale (0.8, 1) + flip) they are recomputed every batch, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bench.data import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from bench.errors import BenchError
from bench.ranges import at_least, momentum_value, positive
from bench.registry import TASKS
from bench.tensorops import resize_bilinear_matmul
from tasks.base import EvalData, FeatureFn, Task, TaskResult, batched_pairs, resize_pair
from tasks.metrics import confusion_matrix, summarize

FLOAT_CACHE_BYTES = 4 * 2**30  # up to this size the cached features are kept as float32 on the device

PRESETS = {
    # native 96-px synthetic scenes; train at half label resolution, evaluate at full resolution. Features are
    # standardised per channel (train-set mean/std, a fixed affine map, so the probe stays linear) so that one
    # learning rate serves every backbone: short CPU runs leave feature scales that differ by orders of magnitude.
    "synthetic": dict(input_size=0, train_mask_size=48, eval_mask_size=0, epochs=25, drop_at=20, lr=0.1,
                      batch_size=64, augment=False, standardize=True),
    # protocols.md §1.3-1.5 (ViT-S/16 DINO/Leopart lr 0.01; use lr=0.1 for ResNet-50 MoCo-style backbones)
    "leopart": dict(input_size=448, train_mask_size=100, eval_mask_size=448, epochs=25, drop_at=20, lr=0.01,
                    batch_size=60, augment=True, standardize=False),
    # the same protocol with Leopart's other per-backbone learning rates (§1.5): 0.1 for MoCo-v2 / DenseCL /
    # MaskContrast ResNet-50, MAE ViT-B/16 and Leopart ViT-B/8; 1.0 for MoCo-v3 ViT-S
    "leopart_r50": dict(input_size=448, train_mask_size=100, eval_mask_size=448, epochs=25, drop_at=20, lr=0.1,
                        batch_size=60, augment=True, standardize=False),
    "leopart_mocov3": dict(input_size=448, train_mask_size=100, eval_mask_size=448, epochs=25, drop_at=20, lr=1.0,
                           batch_size=60, augment=True, standardize=False),
    # ADE20K (data.ade20k, 150 classes, reduce_zero_label), the Leopart / NeCo linear family as NeCo and CrIBo
    # report it there (protocols.md §7.4); not comparable with DINOv2's BNHead or DINOv3's AdamW probes
    "leopart_ade20k": dict(input_size=448, train_mask_size=100, eval_mask_size=448, epochs=25, drop_at=20, lr=0.01,
                           batch_size=60, augment=True, standardize=False),
}


@dataclass
class LinsegConfig:
    preset: str = "synthetic"  # synthetic | leopart | leopart_r50 | leopart_mocov3; unset fields take the preset's
    input_size: Optional[int] = at_least(None, 0)  # square input side; 0 = the dataset's native size
    train_mask_size: Optional[int] = at_least(None, 0)  # label/logit side during training; 0 = input size
    eval_mask_size: Optional[int] = at_least(None, 0)  # side at evaluation; 0 = the ground truth's native size
    epochs: Optional[int] = at_least(None, 1)
    drop_at: Optional[int] = at_least(None, 0)  # epoch of the ×0.1 learning-rate drop
    lr: Optional[float] = positive(None)
    batch_size: Optional[int] = at_least(None, 1)
    augment: Optional[bool] = None
    standardize: Optional[bool] = None  # per-channel train-set standardisation of the frozen features
    momentum: float = momentum_value(0.9)
    weight_decay: float = at_least(1e-4, 0)
    max_train_images: int = at_least(0, 0)  # 0 = the whole train split
    seed: int = at_least(400, 0)

    def validate(self, where: str) -> None:
        if self.preset not in PRESETS:
            raise BenchError(f"{where}.preset: unknown preset '{self.preset}'; valid: {', '.join(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise BenchError(f"{where}: epochs, batch_size and lr must be positive")


def _normalize(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=img.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img.device).view(1, 3, 1, 1)
    return (img.float() / 255.0 - mean) / std


def _augment_pair(img: torch.Tensor, mask: torch.Tensor, size: int, gen: torch.Generator):
    h, w = img.shape[-2:]
    top, left, bh, bw = v2.RandomResizedCrop.get_params(img, [0.8, 1.0], [3 / 4, 4 / 3])
    img = TF.resized_crop(img, top, left, bh, bw, [size or h, size or w],
                          interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    mask = TF.resized_crop(mask[None], top, left, bh, bw, [size or h, size or w],
                           interpolation=v2.InterpolationMode.NEAREST)[0]
    if torch.rand((), generator=gen) < 0.5:
        img, mask = TF.horizontal_flip(img), TF.horizontal_flip(mask)
    return img, mask


def _resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """B×H×W int -> B×size×size nearest."""
    if not size or mask.shape[-1] == size and mask.shape[-2] == size:
        return mask
    return F.interpolate(mask[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def _batches(dataset, indices: list[int], batch_size: int, size: int):
    """Yields (images uint8 B×3×H×W, masks B×H×W) resized to ``size`` (native when 0; then batch 1 if sizes vary)."""
    return batched_pairs(dataset, indices, batch_size, lambda img, mask: resize_pair(img, mask, size))


@TASKS.register("linseg")
class LinearSegmentation(Task):
    config_class = LinsegConfig
    # on these datasets the published protocol is the default (bench.config resolves it below the user's
    # settings): Leopart's linear probe, as Leopart and CrOC report it on PVOC12, COCO-Things, COCO-Stuff
    dataset_defaults = {"voc12": {"preset": "leopart"}, "coco_things": {"preset": "leopart"},
                        "coco_stuff15": {"preset": "leopart"}}
    primary = "miou"

    def evaluate(self, features: FeatureFn, data: EvalData, device: torch.device, backbone=None) -> TaskResult:
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        n_train = len(data.train) if not cfg.max_train_images else min(cfg.max_train_images, len(data.train))
        train_idx = torch.randperm(len(data.train), generator=gen)[:n_train].tolist()
        C = data.num_classes

        def feats(img_u8: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return features(_normalize(img_u8.to(device))).float()

        head: nn.Conv2d | None = None
        cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not cfg.augment:
            for img, mask in _batches(data.train, train_idx, cfg.batch_size, cfg.input_size):
                cache.append((feats(img).half().cpu(), _resize_mask(mask, cfg.train_mask_size)))
        probe_dim = (cache[0][0].shape[1] if cache else
                     feats(next(_batches(data.train, train_idx[:1], 1, cfg.input_size))[0]).shape[1])
        mean = torch.zeros(1, probe_dim, 1, 1, device=device)
        std = torch.ones(1, probe_dim, 1, 1, device=device)
        if cfg.standardize:
            mean, std = self._moments(cache, data.train, train_idx, cfg, feats, device)
            cache = [((f.to(device).float() - mean) / std, m) for f, m in cache]
            cache = [(f.half().cpu(), m) for f, m in cache]
        # the fp16 cache as float32 on the device once, not once per epoch (the same values: fp16 -> fp32 is exact)
        if cache and sum(f.numel() for f, _ in cache) * 4 <= FLOAT_CACHE_BYTES:
            cache = [(f.to(device).float(), m.to(device)) for f, m in cache]
        torch.manual_seed(cfg.seed)
        head = nn.Conv2d(probe_dim, C, kernel_size=1).to(device)
        opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.drop_at, gamma=0.1)
        for _epoch in range(cfg.epochs):
            if cfg.augment:
                order = torch.randperm(len(train_idx), generator=gen).tolist()
                stream = self._augmented(data.train, [train_idx[i] for i in order], cfg, gen, feats)
            else:
                order = torch.randperm(len(cache), generator=gen).tolist()
                stream = ((cache[i][0].to(device).float(), cache[i][1].to(device)) for i in order)
            for f, m in stream:
                if cfg.augment and cfg.standardize:
                    f = (f - mean) / std
                size = m.shape[-2:]
                logits = resize_bilinear_matmul(head(f), size)  # = F.interpolate bilinear, faster backward
                loss = F.cross_entropy(logits, m.to(device), ignore_index=IGNORE_INDEX)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
        cache.clear()

        per_image = []  # C×C per val image, for the leaderboard's bootstrap over images
        shown = None  # the first val images with their labels and predictions, for the figure
        head.eval()
        with torch.no_grad():
            for img, mask in _batches(data.val, list(range(len(data.val))), cfg.batch_size, cfg.input_size):
                out_size = cfg.eval_mask_size or mask.shape[-1]
                mask = _resize_mask(mask, cfg.eval_mask_size)
                logits = F.interpolate(head((feats(img) - mean) / std), size=mask.shape[-2:] if not cfg.eval_mask_size
                                       else (out_size, out_size), mode="bilinear", align_corners=False)
                pred = logits.argmax(1).cpu()
                per_image.extend(confusion_matrix(p, m, C) for p, m in zip(pred, mask))
                if shown is None:
                    shown = (img[:4], mask[:4], pred[:4])
        per_image = torch.stack(per_image).numpy()  # N×C×C
        res = summarize(per_image.sum(0))
        per_class = res.pop("per_class_iou")
        protocol = (f"linseg[{cfg.preset}]: frozen features{' (standardised)' if cfg.standardize else ''}, 1x1 conv, CE ignore 255, SGD lr {cfg.lr} m {cfg.momentum} "
                    f"wd {cfg.weight_decay}, {cfg.epochs} ep (x0.1 at {cfg.drop_at}), input {cfg.input_size or 'native'}, "
                    f"train mask {cfg.train_mask_size or 'input'}, eval mask {cfg.eval_mask_size or 'native'}, "
                    f"{n_train} train / {len(data.val)} val images")
        figures = {}
        if shown is not None:
            from bench.plots import prediction_figure

            title = f"linseg: linear probe predictions, {data.name} val (mIoU {res['miou']:.1f})"
            figures["predictions.png"] = prediction_figure(*shown, data.class_names, title=title)
        return TaskResult(metrics=res, per_class={"iou": per_class}, protocol=protocol, figures=figures,
                          per_image={"confusion": per_image})

    @staticmethod
    def _moments(cache, dataset, indices, cfg, feats, device):
        """Per-channel mean and std (1×C×1×1) of the frozen training features."""
        if cache:
            chunks = [f.float() for f, _ in cache]
        else:
            chunks = [feats(img).cpu() for img, _ in _batches(dataset, indices[:256], cfg.batch_size, cfg.input_size)]
        flat = torch.cat([c.permute(1, 0, 2, 3).reshape(c.shape[1], -1) for c in chunks], dim=1)
        mean, std = flat.mean(1), flat.std(1).clamp_min(1e-6)
        return mean.view(1, -1, 1, 1).to(device), std.view(1, -1, 1, 1).to(device)

    def _augmented(self, dataset, indices, cfg, gen, feats):
        for start in range(0, len(indices), cfg.batch_size):
            imgs, masks = [], []
            for i in indices[start:start + cfg.batch_size]:
                item = dataset[i]
                img, mask = _augment_pair(item["image"], item["mask"], cfg.input_size, gen)
                if imgs and img.shape != imgs[0].shape:  # native sizes that differ (input_size=0): no padding
                    yield feats(torch.stack(imgs)), _resize_mask(torch.stack(masks), cfg.train_mask_size)
                    imgs, masks = [], []
                imgs.append(img)
                masks.append(mask)
            if imgs:
                yield feats(torch.stack(imgs)), _resize_mask(torch.stack(masks), cfg.train_mask_size)
