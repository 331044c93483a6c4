"""Dense nearest-neighbour retrieval ("Hummingbird", Balažević et al. 2023; protocols.md §7.1).

The settings are those of the public re-implementation open-hummingbird-eval (v2), which NeCo, MoSiC, DIP and
Franca report with:

1. Memory: ``augmentation_epochs`` passes over the train split (a seeded ``train_fraction`` of it for the
   data-efficiency setting), each image augmented with a paired random resized crop (scale (0.5, 2.0), output
   ``input_size`` square) and colour jitter on the image only (brightness, contrast, saturation and hue 0.1, each
   applied with p 0.5; torchvision transforms v2). Frozen features B×D×h×w are L2-normalised; every patch
   carries its label histogram (tasks/retrieval.py). With ``memory_size`` > 0 each image contributes
   ``memory_size // (images × epochs)`` patches (at most all of its patches), chosen by the class-frequency score
   that favours rare classes; ``memory_size=0`` keeps every labelled patch.
2. Retrieval: every val patch (val images square-resized to ``input_size``, masks nearest) takes its
   ``n_neighbours`` (30) nearest memory patches by cosine, exact search (faiss ``IndexFlatIP``, GPU index when
   evaluating on a GPU and faiss has GPU support); label distribution Σ softmax(sim / β) · histogram with
   β = 0.02, bilinearly upsampled from the patch grid to the label resolution, argmax.
3. mIoU (percent) from one dataset-level confusion matrix (tasks/metrics.py, NaN-skip), no cluster matching.
   With ``seeds`` > 1 (the data-efficiency presets: 5 seeds 42, 400, 783, 1293, 4019) each seed draws its own
   train subset and augmentations; ``miou`` is the mean and ``miou_std`` the sample std over seeds.

Deviations from open-hummingbird-eval, both recorded in the protocol line: ignore pixels (255) are left out of
the histograms (the reference maps them to class 0, VOC's background; ``ignore_as_class0=true`` does that), and
the bounded memory holds exactly the sampled patches (the reference preallocates ``memory_size`` rows and
leaves the remainder zero when the quota does not divide it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.nn import functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bench.data import IGNORE_INDEX
from bench.errors import BenchError
from bench.registry import TASKS
from tasks.base import EvalData, FeatureFn, Task, TaskResult, batched_pairs, resize_pair
from tasks.cluster import normalize_images
from tasks.metrics import confusion_matrix, summarize
from tasks.retrieval import MemoryBank, patch_histograms, sample_patches

FRACTION_SEEDS = (42, 400, 783, 1293, 4019)  # open-hummingbird-eval's data-efficiency seeds
_FULL = dict(augmentation_epochs=2, train_fraction=1.0, seeds=1, augment=True)
PRESETS = {
    # native 96-px synthetic scenes (12×12 patches with the default ViT-tiny/8): one pass over a quarter of the
    # train split (384 of 1536 images), 36 of 144 patches per image, so the CPU default stays short
    "synthetic": dict(input_size=0, memory_size=384 * 36, augmentation_epochs=1, train_fraction=0.25, seeds=1,
                      augment=True),
    # memory 1024×10², ×10³, ×10⁴ at 512 px (patch-16 models) and 504 px (patch-14 models)
    "m1e2": dict(input_size=512, memory_size=1024 * 10 ** 2, **_FULL),
    "m1e3": dict(input_size=512, memory_size=1024 * 10 ** 3, **_FULL),
    "m1e4": dict(input_size=512, memory_size=1024 * 10 ** 4, **_FULL),
    "m1e2_p14": dict(input_size=504, memory_size=1024 * 10 ** 2, **_FULL),
    "m1e3_p14": dict(input_size=504, memory_size=1024 * 10 ** 3, **_FULL),
    "m1e4_p14": dict(input_size=504, memory_size=1024 * 10 ** 4, **_FULL),
    # data efficiency: 1/8, 1/64, 1/128 of the train split, 5 seeds; memory 1024×10⁴ (so in practice every patch
    # of the few images; the quota is capped at an image's patch count) [I: the memory of these runs]
    "frac8": dict(input_size=512, memory_size=1024 * 10 ** 4, augmentation_epochs=2, train_fraction=1 / 8,
                  seeds=5, augment=True),
    "frac64": dict(input_size=512, memory_size=1024 * 10 ** 4, augmentation_epochs=2, train_fraction=1 / 64,
                   seeds=5, augment=True),
    "frac128": dict(input_size=512, memory_size=1024 * 10 ** 4, augmentation_epochs=2, train_fraction=1 / 128,
                    seeds=5, augment=True),
}


@dataclass
class HbirdConfig:
    preset: str = "synthetic"  # see PRESETS; unset fields below take the preset's value
    input_size: Optional[int] = None  # square side of train crops and val resizes; 0 = the dataset's native size
    memory_size: Optional[int] = None  # patches in the memory; 0 = every labelled patch (unbounded)
    augmentation_epochs: Optional[int] = None  # passes over the train images to fill the memory
    train_fraction: Optional[float] = None  # seeded random fraction of the train split (data efficiency)
    seeds: Optional[int] = None  # repetitions (train subset + augmentations); > 1 uses FRACTION_SEEDS first
    augment: Optional[bool] = None  # the train augmentation (off: square resize as for val)
    n_neighbours: int = 30
    beta: float = 0.02  # softmax temperature of the label transfer (DIP uses 0.07)
    ignore_as_class0: bool = False  # count ignore pixels as class 0 in the histograms (open-hummingbird-eval)
    search: str = "faiss"  # faiss (exact IndexFlatIP) | torch (brute-force matmul, same result)
    batch_size: int = 32
    seed: int = 42  # used when seeds == 1

    def validate(self, where: str) -> None:
        if self.preset not in PRESETS:
            raise BenchError(f"{where}.preset: unknown preset '{self.preset}'; valid: {', '.join(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.input_size < 0 or self.memory_size < 0:
            raise BenchError(f"{where}: input_size and memory_size must be >= 0 (0 = native / unbounded)")
        if self.augmentation_epochs < 1 or self.seeds < 1 or self.n_neighbours < 1 or self.batch_size < 1:
            raise BenchError(f"{where}: augmentation_epochs, seeds, n_neighbours and batch_size must be >= 1")
        if not 0.0 < self.train_fraction <= 1.0:
            raise BenchError(f"{where}.train_fraction: expected a value in (0, 1], got {self.train_fraction}")
        if self.beta <= 0:
            raise BenchError(f"{where}.beta: expected a positive temperature, got {self.beta}")
        if self.search not in ("faiss", "torch"):
            raise BenchError(f"{where}.search: unknown backend '{self.search}'; valid: faiss, torch")


_JITTER = v2.Compose([v2.RandomApply([v2.ColorJitter(brightness=0.1)], p=0.5),
                      v2.RandomApply([v2.ColorJitter(contrast=0.1)], p=0.5),
                      v2.RandomApply([v2.ColorJitter(saturation=0.1)], p=0.5),
                      v2.RandomApply([v2.ColorJitter(hue=0.1)], p=0.5)])


def augment_pair(img: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 3×H×W image and H×W mask -> the same random resized crop of both (scale (0.5, 2.0), ratio 3/4-4/3;
    output ``size`` square, native H×W when 0; bilinear / nearest), then colour jitter on the image.
    Randomness comes from torch's global generator (seeded per repetition by the task)."""
    h, w = img.shape[-2:]
    out = [size, size] if size else [h, w]
    top, left, bh, bw = v2.RandomResizedCrop.get_params(img, [0.5, 2.0], [3 / 4, 4 / 3])
    img = TF.resized_crop(img, top, left, bh, bw, out, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    mask = TF.resized_crop(mask[None], top, left, bh, bw, out, interpolation=v2.InterpolationMode.NEAREST)[0]
    return _JITTER(img), mask


def protocol_line(cfg: HbirdConfig, n_images: int, n_seeds: int, num_classes: int, n_val: int,
                  n_memory: int) -> str:
    """The leaderboard's protocol line; results/reference.yaml matches on its head and substrings."""
    return (f"hbird[{cfg.preset}]: memory {cfg.memory_size or 'all'}, k={cfg.n_neighbours}, beta {cfg.beta}, "
            f"input {cfg.input_size or 'native'}, {cfg.augmentation_epochs} aug epochs, train fraction "
            f"{cfg.train_fraction:.6g} ({n_images} images), {n_seeds} seed(s), "
            f"{'paired crop (0.5, 2) + jitter' if cfg.augment else 'no augmentation'}, exact {cfg.search} search, "
            f"ignore {'as class 0' if cfg.ignore_as_class0 else 'dropped'}, bilinear upsampling, mIoU over "
            f"{num_classes} classes (NaN-skip), {n_val} val images; {n_memory} patches in memory")


@TASKS.register("hbird")
class DenseRetrieval(Task):
    config_class = HbirdConfig
    primary = "miou"

    def evaluate(self, features: FeatureFn, data: EvalData, device: torch.device, backbone=None) -> TaskResult:
        cfg = self.cfg
        seeds = [cfg.seed] if cfg.seeds == 1 else [FRACTION_SEEDS[i] if i < len(FRACTION_SEEDS) else 10_000 + i
                                                   for i in range(cfg.seeds)]
        C = data.num_classes

        def feats(img_u8):
            with torch.no_grad():
                return features(normalize_images(img_u8.to(device))).float()

        val = [(f.cpu(), m) for f, m in self._val_features(data, feats)]
        mious, accs, ious, sizes = [], [], [], []
        for seed in seeds:
            bank, n_images = self.build_memory(feats, data.train, C, seed, gpu=device.type == "cuda")
            conf = torch.zeros(C, C, dtype=torch.long)
            for f, m in val:
                pred = self.predict(bank, f, m.shape[-2:])
                conf += confusion_matrix(pred, m, C)
            res = summarize(conf.numpy())
            mious.append(res["miou"])
            accs.append(res["pixel_acc"])
            ious.append(res["per_class_iou"])
            sizes.append(len(bank))
            del bank
        metrics = {"miou": float(np.mean(mious)),
                   "miou_std": float(np.std(mious, ddof=1)) if len(mious) > 1 else 0.0,
                   "pixel_acc": float(np.mean(accs))}
        with np.errstate(all="ignore"):
            per_class = np.nanmean(np.array(ious, dtype=np.float64), 0) if len(ious) > 1 else np.array(ious[0])
        protocol = protocol_line(cfg, n_images, len(seeds), C, len(data.val), sizes[0])
        return TaskResult(metrics=metrics, protocol=protocol,
                          per_class={"iou": [float(v) for v in per_class], "miou_per_seed": mious,
                                     "memory_patches": sizes})

    def _val_features(self, data, feats):
        cfg = self.cfg
        for img, mask in batched_pairs(data.val, range(len(data.val)), cfg.batch_size,
                                       lambda i, m: resize_pair(i, m, cfg.input_size)):
            yield feats(img), mask

    def _labels(self, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
        if self.cfg.ignore_as_class0:
            mask = torch.where(mask == IGNORE_INDEX, torch.zeros_like(mask), mask)
        return mask

    def build_memory(self, feats, train, num_classes: int, seed: int, gpu: bool = False) -> tuple[MemoryBank, int]:
        """(the filled memory bank, number of train images used) for one repetition; ``gpu``: faiss index on
        the GPU (when faiss has GPU support)."""
        cfg = self.cfg
        from bench.data._real import take_fraction

        indices = take_fraction(list(range(len(train))), cfg.train_fraction, seed)
        gen = torch.Generator().manual_seed(seed)
        quota = cfg.memory_size // (len(indices) * cfg.augmentation_epochs) if cfg.memory_size else 0
        if cfg.memory_size and quota < 1:
            raise BenchError(f"tasks.hbird.memory_size: {cfg.memory_size} patches for {len(indices)} images × "
                             f"{cfg.augmentation_epochs} epochs leaves none per image; expected at least "
                             f"{len(indices) * cfg.augmentation_epochs}")
        torch.manual_seed(seed)  # the augmentations draw from the global generator
        if cfg.augment:
            def transform(i, m):
                return augment_pair(i, m, cfg.input_size)
        else:
            def transform(i, m):
                return resize_pair(i, m, cfg.input_size)
        keys, values = [], []
        for _epoch in range(cfg.augmentation_epochs):
            for img, mask in batched_pairs(train, indices, cfg.batch_size, transform):
                f = feats(img)  # B×D×h×w
                b, d, h, w = f.shape
                hist = patch_histograms(self._labels(mask, num_classes), (h, w), num_classes).reshape(b, h * w, -1)
                flat = F.normalize(f, dim=1).permute(0, 2, 3, 1).reshape(b, h * w, d).cpu()
                for j in range(b):
                    if quota:
                        keep = sample_patches(hist[j], quota, gen)
                    else:
                        keep = (hist[j].sum(1) > 0).nonzero()[:, 0]
                    keys.append(flat[j, keep])
                    values.append(hist[j, keep].half())
        if not keys or sum(k.shape[0] for k in keys) == 0:
            raise BenchError("hbird: no labelled train patches to fill the memory")
        bank = MemoryBank(torch.cat(keys), torch.cat(values), cfg.search, gpu=gpu)
        return bank, len(indices)

    def predict(self, bank: MemoryBank, f: torch.Tensor, size) -> torch.Tensor:
        """Val features B×D×h×w -> B×H×W predicted classes at label size ``size``."""
        b, d, h, w = f.shape
        dist = bank.predict(f.permute(0, 2, 3, 1).reshape(-1, d), self.cfg.n_neighbours, self.cfg.beta)
        dist = dist.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return F.interpolate(dist, size=tuple(size), mode="bilinear", align_corners=False).argmax(1)
