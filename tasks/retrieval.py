"""The parts of dense nearest-neighbour retrieval (``hbird``, protocols.md §7.1) that carry its numbers.

* :func:`patch_histograms`: per-patch label histograms (the fraction of each class among a patch's labelled
  pixels) from label maps at the input resolution.
* :func:`sample_patches`: the bounded memory's per-image choice: ``quota`` patches with the lowest
  class-frequency score ``U(0, 1) · Σ_{c in patch} n_c`` (``n_c`` = how many patches of that image contain
  class c), so patches of the image's rare classes are kept first and ties are broken at random.
* :class:`MemoryBank`: L2-normalised features N×D (float32) with histograms N×C (float16), exact
  inner-product search with faiss (``IndexFlatIP``; on a GPU when asked and faiss was built with GPU support)
  or with a torch matmul (``backend="torch"``, the brute-force reference the tests compare faiss with).
* :func:`transfer_labels`: softmax(similarity / β) over the k neighbours, weights · histograms.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from bench.data import IGNORE_INDEX


def patch_histograms(masks: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """masks B×H×W int (``IGNORE_INDEX`` = unlabelled) -> B×h×w×C class fractions over each patch's labelled
    pixels (a patch with none is all zero). H×W is first nearest-resized to a multiple of the grid."""
    h, w = grid
    b, H, W = masks.shape
    ph, pw = max(1, round(H / h)), max(1, round(W / w))
    if (H, W) != (h * ph, w * pw):
        masks = F.interpolate(masks[:, None].float(), size=(h * ph, w * pw), mode="nearest-exact")[:, 0].long()
    masks = masks.long()
    valid = (masks >= 0) & (masks < num_classes)
    onehot = F.one_hot(torch.where(valid, masks, num_classes), num_classes + 1)[..., :num_classes].float()
    counts = F.avg_pool2d(onehot.permute(0, 3, 1, 2), (ph, pw), divisor_override=1)  # B×C×h×w pixel counts
    total = counts.sum(1, keepdim=True)
    return (counts / total.clamp_min(1)).permute(0, 2, 3, 1).contiguous()


def sample_patches(hist: torch.Tensor, quota: int, gen: torch.Generator) -> torch.Tensor:
    """hist P×C (one image's patches) -> indices of the ``quota`` patches with the lowest class-frequency
    score (rare classes first, random tie-break). Patches without a labelled pixel come last."""
    present = hist > 0  # P×C
    freq = present.sum(0).to(torch.float64)  # patches of this image containing each class
    score = (present.to(torch.float64) * freq).sum(1)
    score = score * torch.rand(score.shape, generator=gen, dtype=torch.float64)
    score[~present.any(1)] = float("inf")
    quota = min(quota, hist.shape[0])
    return torch.topk(score, quota, largest=False).indices


class MemoryBank:
    """Exact cosine k-NN over L2-normalised features (N×D float32) holding label histograms (N×C)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, backend: str = "faiss", gpu: bool = False):
        if features.shape[0] != labels.shape[0] or features.shape[0] == 0:
            raise ValueError(f"memory of {features.shape[0]} features and {labels.shape[0]} histograms")
        self.features = F.normalize(features.float(), dim=1).contiguous()
        self.labels = labels.to(torch.float16)
        self.backend = backend
        self.gpu = False
        if backend == "faiss":
            import faiss

            index = faiss.IndexFlatIP(self.features.shape[1])
            if gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
                self._res = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._res, 0, index)
                self.gpu = True
            index.add(self.features.cpu().numpy())
            self.index = index
        elif backend != "torch":
            raise ValueError(f"unknown search backend '{backend}'; valid: faiss, torch")

    def __len__(self) -> int:
        return self.features.shape[0]

    def search(self, queries: torch.Tensor, k: int, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """queries Q×D (normalised here) -> (similarities Q×k descending, indices Q×k int64)."""
        q = F.normalize(queries.float(), dim=1).cpu().contiguous()
        k = min(k, len(self))
        if self.backend == "faiss":
            sims, idx = self.index.search(q.numpy(), k)
            return torch.from_numpy(sims), torch.from_numpy(idx.astype(np.int64))
        sims, idx = [], []
        for s in range(0, q.shape[0], chunk):
            v, i = (q[s:s + chunk] @ self.features.T).topk(k, dim=1)
            sims.append(v)
            idx.append(i)
        return torch.cat(sims), torch.cat(idx)

    def predict(self, queries: torch.Tensor, k: int, beta: float) -> torch.Tensor:
        """queries Q×D -> Q×C label distributions (:func:`transfer_labels` over the k nearest)."""
        sims, idx = self.search(queries, k)
        return transfer_labels(sims, self.labels[idx].float(), beta)


def transfer_labels(sims: torch.Tensor, neighbour_labels: torch.Tensor, beta: float) -> torch.Tensor:
    """sims Q×k cosine similarities, neighbour_labels Q×k×C histograms -> Q×C: Σ_i softmax(sims/β)_i · hist_i."""
    weights = torch.softmax(sims.float() / beta, dim=1)
    return torch.einsum("qk,qkc->qc", weights, neighbour_labels.float())
