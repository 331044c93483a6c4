"""Unit-norm prototypes scored by a bias-free linear layer (SwAV family: Leopart, ViCE)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Prototypes(nn.Linear):
    """K prototype rows of width D: ``*×D`` unit embeddings -> ``*×K`` cosine scores.

    An ``nn.Linear(D, K, bias=False)`` (same initialisation and state-dict key ``weight``) whose rows are
    re-normalised by :meth:`normalize_` (after each update and before each step, as the references do)."""

    def __init__(self, dim: int, n_prototypes: int):
        super().__init__(dim, n_prototypes, bias=False)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1))
