"""LoopConfig: resolved once in the driver, frozen, typed sections, and the plain-dict form round-trips."""

import dataclasses

import pytest

from bench.config import BackboneConfig, PretrainConfig, load_config
from bench.errors import BenchError
from bench.loopconfig import LoopConfig, loop_config


def test_loop_config_of_a_bench_config_is_typed_frozen_and_round_trips(tmp_path):
    cfg = load_config(None, ["pretrain.batch_size=8", "methods.dino.out_dim=64", "run.seed=7"])
    lc = loop_config(cfg, "dino", cfg.pretrain_for("dino"), str(tmp_path), 3)
    assert isinstance(lc.pretrain, PretrainConfig) and isinstance(lc.backbone, BackboneConfig)
    assert lc.pretrain.cpus_per_worker == 3 and cfg.pretrain_for("dino").cpus_per_worker == 0
    assert lc.method_cfg.out_dim == 64 and lc.pretrain.batch_size == 8 and lc.seed == 7
    assert lc.dataset == "synthetic" and lc.out_dir == str(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lc.seed = 1
    d = lc.to_dict()
    assert set(d) == {"method", "method_cfg", "pretrain", "backbone", "dataset", "dataset_cfg", "seed", "out_dir"}
    assert LoopConfig.from_dict(d) == lc and LoopConfig.coerce(lc) is lc
    # the driver's config is not shared with the loop's copy
    lc.sections().method_cfg.out_dim = 5
    assert lc.method_cfg.out_dim == 64


def test_bad_plain_data_fails_with_the_section_named():
    d = {"method": "dino", "method_cfg": {"no_such": 1}, "pretrain": {}, "backbone": {}, "dataset": "synthetic",
         "dataset_cfg": {}, "seed": 0, "out_dir": "x"}
    with pytest.raises(BenchError, match=r"methods.dino: unknown key 'no_such'"):
        LoopConfig.from_dict(d)
    with pytest.raises(BenchError, match=r"unknown method 'nope'"):
        LoopConfig.from_dict(dict(d, method="nope", method_cfg={}))
