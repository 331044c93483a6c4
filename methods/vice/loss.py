"""ViCE's loss (VISSL ``DenseSwAVCriterion``, spec §1.4): superpixel regions pooled per view, Sinkhorn codes of
view 0's regions (with the queue's rows), swapped prediction by the other views, plus the coherence term.

Region pooling (``regions.py``, scatter ops), per view and image, over the common superpixels:
*representative* mode: the pixel with the highest max-prototype score represents the region, ``e = stopgrad(z̄_i*)``,
``σ = C z̄_i*``, plus ``L_coh = mean_{v,b} mean_r mean_{i∈r} ‖z̄_i − e_r + 1e-6‖``; *mean* mode: ``σ = C·normalise(mean_r
z)`` over ids > 0, no coherence term. ``L_swav = 1/(V−1) Σ_{v≥1} mean_n −Σ_k q log softmax(σ_v/τ)``; the total is
``(w_coh·L_coh + w_swav·L_swav)/2`` (representative) or ``w_swav·L_swav`` (mean). Means are over every worker's
regions (counts all-reduced), so data-parallel workers give the one-process result.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from methods.common.dist import mean_over_workers
from methods.common.sinkhorn import swav_codes
from methods.vice.regions import align_regions, segment_argmax, segment_mean


class ViCELoss(nn.Module):
    """``forward(feats, labels, prototypes, queue_scores, hard)`` -> (loss, pooled regions, codes, logs).

    feats: V × (B×D×h×w) un-normalised maps; labels: V × (B×h×w) region ids (−1 ignore); prototypes K×D unit rows;
    queue_scores L×K or None (prepended for Sinkhorn only); ``hard``: one-hot (argmax) codes this step."""

    def __init__(self, pooling: str = "representative", temperature: float = 0.1, epsilon: float = 0.05,
                 sinkhorn_iters: int = 3, coherence_weight: float = 1.0, swav_weight: float = 1.0):
        super().__init__()
        self.pooling, self.temperature, self.epsilon, self.sinkhorn_iters = pooling, temperature, epsilon, sinkhorn_iters
        self.coherence_weight, self.swav_weight = coherence_weight, swav_weight

    def forward(self, feats: list[torch.Tensor], labels: list[torch.Tensor], prototypes: torch.Tensor,
                queue_scores: torch.Tensor | None = None, hard: bool = False) -> tuple[torch.Tensor, dict, torch.Tensor, dict]:
        pooled = self.pool(feats, labels, prototypes)
        sigma, present = pooled["sigma"], pooled["present"]
        with torch.no_grad():
            codes = swav_codes(sigma[0].detach(), queue_scores, self.epsilon, self.sinkhorn_iters)
            ent = -(codes * codes.clamp_min(1e-12).log()).sum(-1).mean() if codes.numel() else torch.zeros(())
            if hard and codes.numel():
                codes = F.one_hot(codes.argmax(dim=1), codes.shape[1]).to(codes.dtype)
        l_swav, _ = self.swap(sigma, present, codes)
        # keeps every parameter in the graph when this worker holds no region (DDP needs a backward)
        anchor = sum(0.0 * f.mean() for f in feats)
        if self.pooling == "representative":
            l_coh, _ = mean_over_workers(pooled["coh_sum"], pooled["coh_pairs"])
            loss = (self.coherence_weight * l_coh + self.swav_weight * l_swav) / 2 + anchor
        else:
            l_coh = torch.zeros(())
            loss = self.swav_weight * l_swav + anchor
        return loss, pooled, codes, {"loss_swav": float(l_swav.detach()), "loss_coh": float(l_coh.detach()),
                                     "code_entropy": float(ent)}

    def pool(self, feats: list[torch.Tensor], labels: list[torch.Tensor], protos: torch.Tensor) -> dict:
        """Per-view region pooling.

        feats: V × (B×D×h×w) un-normalised maps; labels: V × (B×h×w) ids (−1 ignore). Returns ``sigma`` V×R×K scores,
        ``emb`` R×D view-0 embeddings (detached, for the queue), ``present`` V×R bool, ``image`` R, ``coh_sum``
        (sum over (view, image) pairs of the per-pair coherence) and ``coh_pairs`` (their number).
        """
        b = labels[0].shape[0]
        rep = self.pooling == "representative"
        index, image, _ = align_regions([lab.reshape(b, -1) for lab in labels], ref=0, min_id=0 if rep else 1)
        r = image.numel()
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

    def swap(self, sigma: torch.Tensor, present: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, list]:
        """sigma V×R×K, present V×R, codes R×K (from view 0) -> (mean over views 1.. of per-view global means,
        their global counts)."""
        total = sigma.new_zeros(())
        counts = []
        for v in range(1, sigma.shape[0]):
            logp = F.log_softmax(sigma[v].float() / self.temperature, dim=-1)
            ce = -(codes * logp).sum(dim=-1)
            pv = present[v] & present[0]
            mean_v, n_v = mean_over_workers(ce[pv].sum(), int(pv.sum()))
            total = total + mean_v
            counts.append(n_v)
        return total / max(sigma.shape[0] - 1, 1), counts
