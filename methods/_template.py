"""Template of a method: copy to ``methods/<name>.py``, rename, and register it.

Not registered here on purpose (files starting with ``_`` are skipped by the plugin loader); to make a real
method, replace the marked line below by ``@METHODS.register("<name>")`` above the class. The loop
(``bench.pretrain``) then builds it from ``methods.<name>`` in the config, feeds it the views it asks for
and evaluates ``eval_backbone()`` on every task; ``tests/methods/test_template.py`` shows it running.

What it does (a minimal, working dense objective): two global crops of each image, and for each crop the
backbone's dense features B×C×h×w are pooled to B×C, projected (B×D) and predicted (B×D); the loss is the
symmetric negative cosine between one crop's prediction and the other crop's stop-gradient projection
(SimSiam, Chen & He 2021), in [-1, 1]. A dense method would match features cell by cell instead, through
the crops' ``boxes``/``flips`` and ``methods/common/geometry.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn import functional as F

from bench.data.views import BYOL_JITTER, MultiCropSpec, scaled_jitter
from bench.errors import BenchError
from methods.base import Method


@dataclass
class TemplateConfig:
    """The ``methods.<name>`` section: every field is a hyperparameter that ``--set`` and Tune can change."""

    proj_dim: int = 64  # D, width of the projection and the prediction
    global_size: int = 64  # crop side in pixels (64 px gives an 8×8 grid on the CPU default backbone)
    jitter_strength: float = 1.0  # colour jitter relative to the reference (BYOL's), 0 = none

    def validate(self, where: str) -> None:
        if self.proj_dim < 1:
            raise BenchError(f"{where}.proj_dim: expected a positive width, got {self.proj_dim}")


# @METHODS.register("<name>")   <- the one line that makes a copy of this file a method
class TemplateMethod(Method):
    config_class = TemplateConfig

    def __init__(self, cfg: TemplateConfig, backbone_factory, schedule):
        super().__init__(cfg, backbone_factory, schedule)
        self.backbone = backbone_factory()
        c = self.backbone.embed_dim
        self.projector = nn.Sequential(nn.Linear(c, cfg.proj_dim), nn.GELU(), nn.Linear(cfg.proj_dim, cfg.proj_dim))
        self.predictor = nn.Sequential(nn.Linear(cfg.proj_dim, cfg.proj_dim), nn.GELU(),
                                       nn.Linear(cfg.proj_dim, cfg.proj_dim))

    def view_spec(self) -> MultiCropSpec:
        return MultiCropSpec(n_global=2, global_size=self.cfg.global_size, n_local=0,
                             jitter=scaled_jitter(BYOL_JITTER, self.cfg.jitter_strength))

    def training_step(self, batch: dict, step: int) -> dict:
        a, b = batch["views"][:2]  # B×3×s×s each
        za, zb = (self.projector(self.backbone.forward_dense(v).mean((2, 3))) for v in (a, b))  # B×D
        pa, pb = self.predictor(za), self.predictor(zb)
        loss = -0.5 * (F.cosine_similarity(pa, zb.detach()).mean() + F.cosine_similarity(pb, za.detach()).mean())
        return {"loss": loss, "proj_std": float(F.normalize(za.detach(), dim=1).std(0).mean())}

    def eval_backbone(self) -> nn.Module:
        return self.backbone

    @classmethod
    def search_space(cls) -> dict:
        from ray import tune

        return {"proj_dim": tune.choice([32, 64, 128])}


__all__ = ["TemplateConfig", "TemplateMethod"]
