"""A cheap intermediate score of the dense features during pretraining (ASHA's early-stopping signal).

``pretrain.proxy_every = N > 0`` makes rank 0 of ``bench.pretrain.train_loop`` call :class:`Proxy` every N steps
(and at the last step); the score goes into the metrics passed to ``ray.train.report`` (key ``proxy``) and into
``metrics.jsonl``. ``bench tune`` uses it as ASHA's metric; the search objective stays the final task metric.

Held-out split: the first ``pretrain.proxy_images`` images (default 32) of the pretraining dataset's ``val``
split, never seen by pretraining. Two scores, both mIoU in percent from one confusion matrix (tasks/metrics.py):

- ``knn`` (default): the first half of the images is the support set, the second half the queries. Features
  ``method.dense_features`` (B×C×h×w) are L2-normalised per token; support tokens take the label of the mask
  pixel at their centre (nearest down-sampling; ignore pixels dropped); each query token takes the
  similarity-weighted vote (``exp(cos / 0.07)``, as DINO's k-NN classifier) of its k = 10 most similar
  support tokens; token predictions are nearest-upsampled to the mask size.
- ``kmeans``: k-means (K = number of classes, k-means++ seeding, seed 0) over all tokens of all images,
  Hungarian matching of clusters to classes, as the ``cluster`` task does but on 32 images.

Both are deterministic and do not touch the training RNG (``torch.random.fork_rng``), so the trained weights are
the same with the proxy on or off. Cost on the CPU default (32 images, ViT-tiny, 12×12 tokens): one forward
of 32 images plus a 2304×2304 similarity, well under a second.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from bench.data import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from bench.errors import BenchError

METRICS = ("knn", "kmeans")
KNN_K = 10
KNN_TEMPERATURE = 0.07


def check_settings(every: int, images: int, metric: str, where: str = "pretrain") -> None:
    if every < 0:
        raise BenchError(f"{where}.proxy_every: expected 0 (off) or a positive number of steps, got {every}")
    if metric not in METRICS:
        raise BenchError(f"{where}.proxy_metric: unknown '{metric}'; valid: {', '.join(METRICS)}")
    if every and images < 2:
        raise BenchError(f"{where}.proxy_images: expected at least 2 held-out images, got {images}")


def knn_predict(support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, num_classes: int,
                k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> torch.Tensor:
    """support S×C and query Q×C unit vectors, labels S int -> Q predicted labels (weighted k-NN vote)."""
    k = min(k, support.shape[0])
    sims, idx = (query @ support.T).topk(k, dim=1)  # Q×k
    votes = torch.zeros(query.shape[0], num_classes, dtype=sims.dtype, device=sims.device)
    votes.scatter_add_(1, labels[idx], torch.exp(sims / temperature))
    return votes.argmax(1)


def knn_miou(feats: torch.Tensor, masks: torch.Tensor, num_classes: int) -> float:
    """feats B×C×h×w, masks B×H×W (255 = ignore) -> k-NN token-label mIoU (percent) of the second half."""
    from tasks.metrics import confusion_matrix, mean_iou

    b, c, h, w = feats.shape
    n_sup = b // 2
    unit = F.normalize(feats.float(), dim=1)
    tok_labels = F.interpolate(masks[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()  # B×h×w
    sup = unit[:n_sup].permute(0, 2, 3, 1).reshape(-1, c)
    lab = tok_labels[:n_sup].reshape(-1)
    keep = lab != IGNORE_INDEX
    sup, lab = sup[keep], lab[keep]
    if sup.shape[0] == 0:
        return float("nan")
    query = unit[n_sup:].permute(0, 2, 3, 1).reshape(-1, c)
    pred = knn_predict(sup, lab, query, num_classes).view(b - n_sup, 1, h, w).float()
    pred = F.interpolate(pred, size=masks.shape[-2:], mode="nearest")[:, 0].long()
    conf = confusion_matrix(pred.cpu(), masks[n_sup:].cpu(), num_classes)
    return 100.0 * mean_iou(conf.numpy())


def kmeans_miou(feats: torch.Tensor, masks: torch.Tensor, num_classes: int) -> float:
    """feats B×C×h×w, masks B×H×W -> k-means (K = classes) + Hungarian mIoU (percent) over all images."""
    from methods.common.clustering import assign, kmeans
    from tasks.metrics import confusion_matrix, mean_iou, remap_confusion, hungarian_match

    b, c, h, w = feats.shape
    x = F.normalize(feats.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, c)
    centroids, _ = kmeans(x, num_classes, iters=30, seed=0)
    labels, _ = assign(x, centroids)
    pred = labels.view(b, 1, h, w).float()
    pred = F.interpolate(pred, size=masks.shape[-2:], mode="nearest")[:, 0].long()
    conf = confusion_matrix(pred.cpu(), masks.cpu(), num_classes).numpy()
    conf = remap_confusion(conf, hungarian_match(conf), num_classes)
    return 100.0 * mean_iou(conf)


class Proxy:
    """Held-out images loaded once; ``score(method)`` -> float mIoU in percent."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, num_classes: int, metric: str = "knn",
                 batch_size: int = 16):
        """images N×3×H×W normalised float, masks N×H×W int64."""
        self.images, self.masks = images, masks
        self.num_classes, self.metric, self.batch_size = num_classes, metric, batch_size

    @classmethod
    def from_loop_config(cls, loop_config, pcfg) -> "Proxy":
        """The val split of the pretraining dataset of ``loop_config`` (a ``LoopConfig``, or a dict with
        ``dataset`` and ``dataset_cfg`` as plain data)."""
        from bench.config import build
        from bench.data import build_dataset
        from bench.registry import DATASETS

        check_settings(pcfg.proxy_every, pcfg.proxy_images, pcfg.proxy_metric)
        if isinstance(loop_config, dict):
            name = loop_config["dataset"]
            dcfg = build(DATASETS.get(name).config_class, loop_config["dataset_cfg"], f"data.{name}")
        else:
            name, dcfg = loop_config.dataset, loop_config.dataset_cfg
        val = build_dataset(name, dcfg, "val")
        n = min(pcfg.proxy_images, len(val))
        if n < 2:
            raise BenchError(f"pretrain.proxy_every: the '{name}' val split has {len(val)} image(s); "
                             f"the proxy needs at least 2")
        items = [val[i] for i in range(n)]
        shapes = {tuple(it["image"].shape) for it in items}
        if len(shapes) > 1:  # real datasets: one common size so that the images batch
            side = min(min(s[1:]) for s in shapes)
            items = [_square(it, side) for it in items]
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        images = (torch.stack([it["image"] for it in items]).float() / 255.0 - mean) / std
        masks = torch.stack([it["mask"] for it in items]).long()
        return cls(images, masks, val.num_classes, pcfg.proxy_metric)

    @torch.no_grad()
    def features(self, method, device: torch.device) -> torch.Tensor:
        out = []
        for s in range(0, self.images.shape[0], self.batch_size):
            out.append(method.dense_features(self.images[s:s + self.batch_size].to(device)).float().cpu())
        return torch.cat(out)

    def score(self, method, device: torch.device) -> float:
        """Evaluation mode, no autocast, training RNG untouched; the method is put back in training mode."""
        was_training = method.training
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.autocast(device.type, enabled=False):
            method.eval()
            try:
                feats = self.features(method, device)
            finally:
                method.train(was_training)
            fn = knn_miou if self.metric == "knn" else kmeans_miou
            return float(fn(feats, self.masks, self.num_classes))

    def metrics(self, method, device: torch.device) -> dict:
        """``{"proxy": score, "proxy_s": seconds}`` for the loop's report."""
        import time

        t = time.perf_counter()
        value = self.score(method, device)
        return {"proxy": value, "proxy_s": time.perf_counter() - t}


def _square(item: dict, side: int) -> dict:
    """Centre crop to side×side (images of different sizes in a real val split)."""
    img, mask = item["image"], item["mask"]
    h, w = img.shape[-2:]
    top, left = (h - side) // 2, (w - side) // 2
    return {"image": img[:, top:top + side, left:left + side], "mask": mask[top:top + side, left:left + side]}
