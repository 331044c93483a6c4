"""Sinkhorn-Knopp, in the two forms the methods use (methods.md §0.1 and §3.3).

``swav_sinkhorn``: SwAV/SeLa equipartition codes over a batch (ViCE, Leopart). Distributed-correct: the
global max, the total mass and the prototype (row) sums are all-reduced across workers; sample (column)
sums are local because each sample lives on one worker. Computed in the log domain's safe form: scores are
shifted by their global max before ``exp`` (VISSL/ViCE), which leaves the result unchanged.

``sinkhorn_plan``: entropic optimal transport with given marginals and cost (CrOC), batched over problems:
P ∝ exp(−λ M), rows scaled to ``a`` then columns to ``b``, ``n_iter`` times.
"""

from __future__ import annotations

import torch

from methods.common.dist import all_reduce_max, all_reduce_sum


@torch.no_grad()
def swav_sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iter: int = 3) -> torch.Tensor:
    """scores B×K (local samples × prototypes) -> codes B×K, each row summing to 1.

    Q = exp(S/ε)ᵀ (K×B_glob), Q /= ΣQ; repeat: rows to 1/K (all-reduced sums), columns to 1/B_glob; then
    each column is scaled to sum 1. With the reference's 3 iterations prototype masses are not yet equal.
    """
    # float64: with the global max subtracted, exp(·) only underflows for (max − min)/ε > 700, i.e. never for
    # cosine scores at any sensible ε (float32 already loses whole prototype rows below ε ≈ 0.02).
    # in place on one fresh buffer: on CPU, allocating a new B×K float64 array per op costs more than the op
    s = scores.double().div_(epsilon) if scores.dtype != torch.float64 else scores / epsilon
    local_max = s.max() if s.numel() else torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    q0 = s.sub_(all_reduce_max(local_max.clone())).exp_()  # B×K; the plan is diag(c)·q0·diag(r)
    b_local, k = q0.shape
    # ViCE's workers hold different numbers of regions, so B_glob is the all-reduced count (== world·B_local
    # when every worker holds the same number, the SwAV case).
    b_glob = int(all_reduce_sum(torch.tensor([float(b_local)], dtype=s.dtype, device=s.device)).item())
    if n_iter <= 0:
        return q0.mul_(b_glob / all_reduce_sum(q0.sum().clone())).float()
    # Each iteration is the reference's two in-place normalisations of Q = exp(S/ε)ᵀ (prototype rows to 1/K,
    # sample columns to 1/B_glob), done on the vectors: two mat-vec products instead of four passes over Q.
    # The reference's initial division by ΣQ is a global factor that the first row scaling absorbs.
    c = torch.ones(b_local, dtype=s.dtype, device=s.device)
    for _ in range(n_iter):
        r = 1.0 / (k * all_reduce_sum(q0.t() @ c))  # K: 1/(K · prototype mass)
        c = 1.0 / (b_glob * (q0 @ r))  # B: 1/(B_glob · sample mass)
    return q0.mul_(r.unsqueeze(0)).mul_((b_glob * c).unsqueeze(1)).float()


@torch.no_grad()
def sinkhorn_plan(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lam: float = 20.0,
                  n_iter: int = 5) -> torch.Tensor:
    """cost P×N×K, a P×N (row marginals), b P×K (column marginals) -> plan P×N×K.

    Starts from exp(−λ M) normalised to mass 1 per problem; each iteration scales rows to ``a`` then columns
    to ``b``. NaNs (from empty rows/columns) become 1e-8, as in the reference.
    """
    logits = -lam * cost.float()
    logits = logits - logits.amax(dim=(1, 2), keepdim=True)  # exp-safe; cancels in the normalisation
    p = torch.exp(logits)
    p = p / p.sum(dim=(1, 2), keepdim=True)
    for _ in range(n_iter):
        p = p * (a / p.sum(dim=2).clamp_min(1e-30)).unsqueeze(2)
        p = p * (b / p.sum(dim=1).clamp_min(1e-30)).unsqueeze(1)
    return torch.nan_to_num(p, nan=1e-8)


class EmbeddingQueue(torch.nn.Module):
    """FIFO of the most recent ``length`` embeddings (length×D) of this worker, for Sinkhorn on small batches.

    SwAV/ViCE/Leopart keep one queue per worker: rows are never exchanged, only the Sinkhorn sums are
    all-reduced. A method that runs under DDP must list the buffers in ``_ddp_params_and_buffers_to_ignore``
    so that DDP's buffer broadcast does not replace every worker's queue with rank 0's.
    ``init="uniform"``: U(−1/√(D/3), 1/√(D/3)) (ViCE, VISSL); ``"zeros"``: SwAV/Leopart, where the queue joins
    Sinkhorn only once its last row is non-zero (``full``). The buffers are not persistent: the per-worker length
    depends on the worker count, so a queue stays out of checkpoints (a resumed run refills it).
    """

    def __init__(self, length: int, dim: int, init: str = "zeros"):
        super().__init__()
        if init not in ("zeros", "uniform"):
            raise ValueError(f"queue init '{init}': expected zeros or uniform")
        items = torch.zeros(length, dim)
        if init == "uniform":
            bound = 1.0 / (dim / 3.0) ** 0.5
            items.uniform_(-bound, bound)
        self.register_buffer("items", items, persistent=False)
        self.register_buffer("pushed", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def length(self) -> int:
        return self.items.shape[0]

    @property
    def full(self) -> bool:
        return self.length > 0 and int(self.pushed) >= self.length

    @torch.no_grad()
    def push(self, emb: torch.Tensor) -> None:
        """emb N×D: the newest rows go to the front; when N > length only the first ``length`` are kept."""
        n = min(emb.shape[0], self.length)
        if n == 0:
            return
        self.items.copy_(torch.cat([emb[:n].to(self.items.dtype), self.items[: self.length - n]]))
        self.pushed += n

    @torch.no_grad()
    def scores(self, prototypes: torch.Tensor) -> torch.Tensor:
        """prototypes K×D -> length×K scores with the *current* prototypes (recomputed every step)."""
        return self.items @ prototypes.detach().t().to(self.items.dtype)


@torch.no_grad()
def swav_codes(scores: torch.Tensor, queue_scores: torch.Tensor | None = None, epsilon: float = 0.05,
               n_iter: int = 3) -> torch.Tensor:
    """Codes for ``scores`` (B×K) with optional queue scores (L×K) prepended for the Sinkhorn step only."""
    if queue_scores is None or queue_scores.shape[0] == 0:
        return swav_sinkhorn(scores, epsilon, n_iter)
    q = swav_sinkhorn(torch.cat([queue_scores.to(scores.dtype), scores.detach()]), epsilon, n_iter)
    return q[queue_scores.shape[0]:]
