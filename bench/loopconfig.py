"""``LoopConfig``: everything one pretraining needs, resolved and validated once in the driver, then sent to
every Ray Train worker as one frozen object (``bench.launch``) and read by ``bench.pretrain.train_loop``.

Its sections are the typed, validated config dataclasses (``methods.<name>``, ``pretrain``, ``backbone``,
``data.<name>``), so a worker never re-parses plain dicts; ``from_dict``/``to_dict`` convert to and from the
plain-data form (tests, ``bench tune``'s per-trial overrides, logs).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from bench.config import BackboneConfig, BenchConfig, PretrainConfig, build, to_dict
from bench.registry import DATASETS, METHODS


@dataclass(frozen=True)
class LoopConfig:
    method: str  # a registered method name
    method_cfg: Any  # that method's config dataclass (``METHODS.get(method).config_class``), validated
    pretrain: PretrainConfig
    backbone: BackboneConfig
    dataset: str  # a registered dataset name (its train split is pretrained on)
    dataset_cfg: Any  # that dataset's config dataclass, validated
    seed: int
    out_dir: str  # checkpoints/, metrics.jsonl, final.pt (shared storage on a cluster)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopConfig":
        """Plain data (the keys above, sections as dicts) -> a validated ``LoopConfig`` (clear errors otherwise)."""
        method, dataset = d["method"], d["dataset"]
        return cls(method=method,
                   method_cfg=build(METHODS.get(method).config_class, d.get("method_cfg"), f"methods.{method}"),
                   pretrain=build(PretrainConfig, d.get("pretrain"), "pretrain"),
                   backbone=build(BackboneConfig, d.get("backbone"), "backbone"),
                   dataset=dataset,
                   dataset_cfg=build(DATASETS.get(dataset).config_class, d.get("dataset_cfg"), f"data.{dataset}"),
                   seed=int(d["seed"]), out_dir=str(d["out_dir"]))

    @classmethod
    def coerce(cls, value: "LoopConfig | dict") -> "LoopConfig":
        return value if isinstance(value, LoopConfig) else cls.from_dict(value)

    def to_dict(self) -> dict:
        return {"method": self.method, "method_cfg": to_dict(self.method_cfg), "pretrain": to_dict(self.pretrain),
                "backbone": to_dict(self.backbone), "dataset": self.dataset, "dataset_cfg": to_dict(self.dataset_cfg),
                "seed": self.seed, "out_dir": self.out_dir}

    def replace(self, **changes) -> "LoopConfig":
        return dataclasses.replace(self, **changes)

    def sections(self) -> "LoopConfig":
        """A copy whose sections are private to the caller (the loop may hand them to code that mutates)."""
        return dataclasses.replace(self, method_cfg=copy.deepcopy(self.method_cfg),
                                   pretrain=copy.deepcopy(self.pretrain), backbone=copy.deepcopy(self.backbone),
                                   dataset_cfg=copy.deepcopy(self.dataset_cfg))


def loop_config(cfg: BenchConfig, method: str, pcfg: PretrainConfig, out_dir: str, cpus: int) -> LoopConfig:
    """The ``LoopConfig`` of one method of a bench config (``bench run``, ``bench tune`` trials, ``bench perf``);
    ``cpus``: the CPU threads of each worker (``pretrain.cpus_per_worker``)."""
    name = cfg.run.pretrain_dataset()
    return LoopConfig(method=method, method_cfg=copy.deepcopy(cfg.methods[method]),
                      pretrain=dataclasses.replace(pcfg, cpus_per_worker=cpus),
                      backbone=copy.deepcopy(cfg.backbone_for(method)), dataset=name, dataset_cfg=copy.deepcopy(cfg.data[name]),
                      seed=cfg.run.seed, out_dir=out_dir)
