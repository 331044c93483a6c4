"""linseg's feature cache (augment=false presets): features extracted once; kept as float32 on the device when
they fit, else as fp16 converted per batch. Both give the same probe bit for bit (fp16 -> fp32 is exact)."""

import pytest
import torch

import tasks.linseg as linseg


def _evaluate(monkeypatch, limit: int, calls: list) -> dict:
    from bench import plugins
    from bench.config import build, load_config
    from bench.evaluate import feature_fn, load_eval_data
    from bench.evaluate import eval_spec
    from bench.registry import TASKS

    plugins.load_all()
    monkeypatch.setattr(linseg, "FLOAT_CACHE_BYTES", limit)
    cfg = load_config(None, ["data.synthetic.num_train=32", "data.synthetic.num_val=8", "tasks.linseg.epochs=3",
                             "tasks.linseg.drop_at=2", "tasks.linseg.batch_size=8"],
                      {"run": {"methods": ["dino"], "tasks": ["linseg"]}})
    spec = eval_spec(cfg, "dino", 32)
    feats, _ = feature_fn("dino", None, spec, torch.device("cpu"))

    def counted(x):
        calls.append(x.shape[0])
        return feats(x)

    cls = TASKS.get("linseg")
    task = cls(build(cls.config_class, spec["tasks"]["linseg"], "tasks.linseg"))
    assert task.cfg.augment is False and task.cfg.epochs == 3
    return task.evaluate(counted, load_eval_data(spec["eval_dataset"], spec["eval_dataset_cfg"]),
                         torch.device("cpu")).metrics


def test_float_cache_gives_the_fp16_paths_numbers_and_extracts_once(monkeypatch):
    fast, slow = [], []
    a = _evaluate(monkeypatch, linseg.FLOAT_CACHE_BYTES, fast)
    b = _evaluate(monkeypatch, 0, slow)  # 0: the per-batch fp16 -> fp32 path
    assert a == b and a["miou"] == pytest.approx(b["miou"], abs=0)
    # train features once (32 images), then the 8 val images: never once per epoch
    assert sum(fast) == sum(slow) == 32 + 8
