"""Cached cells (bench.cache): hits for the same key, misses for a changed seed, protocol setting, code version
or checkpoint; nothing stale."""

import os

from bench.cache import Cache, code_version, eval_key, pretrain_key


def _loop(seed=0, lr=5e-4, out="/runs/a/dino", cpus=2):
    return {"method": "dino", "method_cfg": {"teacher_temp": 0.04}, "backbone": {"name": "vit", "init": ""},
            "pretrain": {"lr": lr, "epochs": 1, "cpus_per_worker": cpus}, "dataset": "synthetic",
            "dataset_cfg": {"root": "/data/x", "num_train": 64}, "seed": seed, "out_dir": out}


def test_pretrain_key_changes_with_seed_config_recipe_and_code_only():
    k = pretrain_key(_loop(), code="c1")
    assert pretrain_key(_loop(out="/runs/b/dino", cpus=8), code="c1") == k  # folder and threads do not matter
    assert pretrain_key({**_loop(), "dataset_cfg": {"root": "/elsewhere", "num_train": 64}}, code="c1") == k
    assert pretrain_key(_loop(seed=1), code="c1") != k
    assert pretrain_key(_loop(lr=1e-3), code="c1") != k
    assert pretrain_key(_loop(), recipe="dino-paper", code="c1") != k
    assert pretrain_key(_loop(), code="c2") != k


def test_eval_key_changes_with_checkpoint_protocol_data_and_code():
    model = {"checkpoint": "sha-a"}
    proto = {"protocol_name": "linseg", "protocol_version": 1, "protocol_hash": "h1"}
    k = eval_key(model, "linseg", proto, "synthetic", {"num_val": 16}, code="c1")
    assert eval_key(model, "linseg", dict(proto), "synthetic", {"num_val": 16, "root": "/x"}, code="c1") == k
    for changed in (eval_key({"checkpoint": "sha-b"}, "linseg", proto, "synthetic", {"num_val": 16}, code="c1"),
                    eval_key(model, "linseg", {**proto, "protocol_hash": "h2"}, "synthetic", {"num_val": 16},
                             code="c1"),
                    eval_key(model, "linseg", {**proto, "protocol_version": 2}, "synthetic", {"num_val": 16},
                             code="c1"),
                    eval_key(model, "linseg", proto, "synthetic", {"num_val": 32}, code="c1"),
                    eval_key(model, "linseg", proto, "voc12", {"num_val": 16}, code="c1"),
                    eval_key(model, "linseg", proto, "synthetic", {"num_val": 16}, code="c2")):
        assert changed != k


def test_protocol_hash_follows_the_resolved_task_settings():
    from bench.config import build
    from bench.registry import TASKS

    cls = TASKS.get("linseg")
    h = cls(build(cls.config_class, {}, "tasks.linseg")).protocol_hash()
    assert cls(build(cls.config_class, {"preset": "synthetic"}, "tasks.linseg")).protocol_hash() == h  # same values
    assert cls(build(cls.config_class, {"epochs": 24}, "tasks.linseg")).protocol_hash() != h
    assert cls(build(cls.config_class, {"preset": "leopart"}, "tasks.linseg")).protocol_hash() != h


def test_code_version_is_the_content_of_the_sources(tmp_path):
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "m.py").write_text("x = 1\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "leaderboard.py").write_text("y = 1\n")
    v1 = code_version(("bench", "methods"), str(tmp_path))
    (tmp_path / "bench" / "leaderboard.py").write_text("y = 2\n")  # presentation only: same version
    code_version.cache_clear()
    assert code_version(("bench", "methods"), str(tmp_path)) == v1
    (tmp_path / "methods" / "m.py").write_text("x = 2\n")  # an uncommitted edit of method code counts
    code_version.cache_clear()
    assert code_version(("bench", "methods"), str(tmp_path)) != v1
    code_version.cache_clear()


def test_pretrain_hit_miss_and_stale_checkpoint(tmp_path):
    cache = Cache(str(tmp_path))
    final = tmp_path / "run" / "final.pt"
    final.parent.mkdir()
    final.write_bytes(b"weights-1")
    key = pretrain_key(_loop(), code="c1")
    assert cache.lookup_pretrain(key) is None
    cache.store_pretrain(key, str(final), {"steps": 3}, {"run_id": "a"})
    hit = cache.lookup_pretrain(key)
    assert hit["run_id"] == "a" and hit["summary"] == {"steps": 3}
    assert cache.lookup_pretrain(pretrain_key(_loop(seed=1), code="c1")) is None
    assert Cache(str(tmp_path), enabled=False).lookup_pretrain(key) is None  # --no-cache
    final.write_bytes(b"weights-2, overwritten")  # the file no longer is what was cached
    assert cache.lookup_pretrain(key) is None
    os.remove(final)
    assert cache.lookup_pretrain(key) is None


def test_eval_hit_restores_result_and_per_image_file(tmp_path):
    from bench import checkpoint as ckpt

    src = tmp_path / "a"
    src.mkdir()
    (src / "eval_linseg_per_image.npz").write_bytes(b"npz")
    ckpt.save_json({"metrics": {"miou": 50.0}, "per_image_file": "eval_linseg_per_image.npz", "figures": {}},
                   str(src / "eval_linseg.json"))
    cache = Cache(str(tmp_path))
    cache.store_eval("k1", str(src / "eval_linseg.json"), {"run_id": "a", "key": "k1"})
    hit = cache.lookup_eval("k1")
    assert hit and cache.lookup_eval("k2") is None
    res = Cache.restore_eval(hit, str(tmp_path / "b"), "linseg")
    assert res["metrics"] == {"miou": 50.0} and res["cached_from"]["run_id"] == "a"
    assert (tmp_path / "b" / "eval_linseg_per_image.npz").read_bytes() == b"npz"
    os.remove(src / "eval_linseg_per_image.npz")
    assert cache.lookup_eval("k1") is None  # its per-image file is gone: recompute
