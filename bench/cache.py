"""Cached cells: a finished pretraining or evaluation is reused when its key matches, never when anything that
can change its number differs.

- pretraining key: the resolved loop config (method, pretrain, backbone, data settings, seed; not the output
  folder or the thread count), the recipe, and the code version of ``bench/`` and ``methods/``;
- evaluation key: the checkpoint's SHA-256 (or, for the untrained baseline, the backbone settings, init file
  hash and seed), the task's protocol name/version/settings hash, the evaluation data settings, and the code
  version of ``bench/``, ``methods/`` and ``tasks/``.

The code version is the hash of the git blob ids of the source files *as they are on disk* (uncommitted edits
count), so a different commit of the method or task code is a different key. Modules that only present
numbers (tables, figures, UI, tracking) are left out. Entries live in ``<storage>/cache/{pretrain,eval}/<key>.json``
(atomic writes; two runs may write the same entry), each naming the files it stands for, and are checked on
use: a checkpoint whose hash no longer matches is a miss.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil

from bench import checkpoint as ckpt

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# modules that cannot change a pretraining or an evaluation number
PRESENTATION = {"bench/leaderboard.py", "bench/board.py", "bench/significance.py", "bench/figures.py", "bench/ui.py",
                "bench/tracking.py", "bench/cache.py", "bench/reproduce.py", "bench/cli.py", "bench/submit.py",
                "bench/perf.py"}


def blob_id(path: str) -> str:
    """The git object id of a file's content (``git hash-object``)."""
    with open(path, "rb") as fh:
        data = fh.read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.lru_cache(maxsize=8)
def code_version(roots: tuple = ("bench", "methods"), project: str = PROJECT) -> str:
    """12 hex digits over (path, blob id) of every .py/.yaml file under ``roots`` (presentation modules left out)."""
    h = hashlib.sha1()
    for root in roots:
        for dirpath, dirnames, files in os.walk(os.path.join(project, root)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for name in sorted(files):
                if not name.endswith((".py", ".yaml", ".yml")):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, project).replace(os.sep, "/")
                if rel in PRESENTATION or rel.startswith("bench/tune"):
                    continue
                h.update(f"{rel} {blob_id(path)}\n".encode())
    return h.hexdigest()[:12]


def digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _stat(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def data_settings(cfg: dict) -> dict:
    """A dataset's settings without its ``root``: the same data at another path is the same key."""
    return {k: v for k, v in (cfg or {}).items() if k != "root"}


# pretrain settings that say where and how wide a loop runs, not what it computes: left out of the keys
PLACEMENT_ONLY = ("cpus_per_worker", "local_mode")


def pretrain_key(loop_cfg: dict, recipe: str = "", code: str | None = None) -> str:
    train = {k: v for k, v in loop_cfg.items() if k != "out_dir"}
    train["pretrain"] = {k: v for k, v in train["pretrain"].items() if k not in PLACEMENT_ONLY}
    train["dataset_cfg"] = data_settings(train.get("dataset_cfg"))
    return digest({"train": train, "recipe": recipe, "code": code or code_version(("bench", "methods"))})


def eval_key(model: dict, task: str, protocol: dict, eval_data: str, eval_data_cfg: dict,
             code: str | None = None) -> str:
    """``model``: {"checkpoint": sha256, "method_cfg": ..., "backbone": ...} or the baseline's settings."""
    return digest({"model": model, "task": task, "protocol": protocol, "data": eval_data,
                   "data_cfg": data_settings(eval_data_cfg),
                   "code": code or code_version(("bench", "methods", "tasks"))})


def link_or_copy(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


class Cache:
    """Index of finished cells under ``<storage>/cache``; ``enabled=False`` (``--no-cache``) never reads it but
    still records new cells, so a later run can reuse them."""

    def __init__(self, storage: str, enabled: bool = True):
        self.root = os.path.join(storage, "cache")
        self.enabled = enabled

    def _path(self, kind: str, key: str) -> str:
        return os.path.join(self.root, kind, f"{key}.json")

    def checkpoint_hash(self, final: str) -> str:
        """SHA-256 of a checkpoint, remembered next to it by (size, mtime) so big files are read once."""
        side = final + ".sha256.json"
        stat = _stat(final)
        if os.path.exists(side):
            try:
                rec = ckpt.load_json(side)
                if rec.get("stat") == stat:
                    return rec["sha256"]
            except (OSError, ValueError, KeyError):
                pass
        sha = file_sha256(final)
        try:
            ckpt.save_json({"stat": stat, "sha256": sha}, side)
        except OSError:  # a read-only folder (an --init checkpoint somewhere shared): hash again next time
            pass
        return sha

    # ---- pretraining
    def lookup_pretrain(self, key: str) -> dict | None:
        if not self.enabled or not os.path.exists(self._path("pretrain", key)):
            return None
        entry = ckpt.load_json(self._path("pretrain", key))
        final = entry.get("final", "")
        if not os.path.exists(final) or self.checkpoint_hash(final) != entry.get("sha256"):
            return None  # moved, deleted or overwritten since: stale
        return entry

    def store_pretrain(self, key: str, final: str, summary: dict, origin: dict) -> dict:
        entry = {"final": os.path.abspath(final), "sha256": self.checkpoint_hash(final), "summary": summary, **origin}
        ckpt.save_json(entry, self._path("pretrain", key))
        return entry

    # ---- evaluation
    def lookup_eval(self, key: str) -> dict | None:
        if not self.enabled or not os.path.exists(self._path("eval", key)):
            return None
        entry = ckpt.load_json(self._path("eval", key))
        if not os.path.exists(entry.get("result", "")):
            return None
        npz = entry.get("per_image")
        if npz and not os.path.exists(npz):
            return None
        return entry

    def store_eval(self, key: str, result_path: str, origin: dict) -> None:
        res = ckpt.load_json(result_path)
        npz = res.get("per_image_file")
        entry = {"result": os.path.abspath(result_path),
                 "per_image": os.path.abspath(os.path.join(os.path.dirname(result_path), npz)) if npz else None,
                 **origin}
        ckpt.save_json(entry, self._path("eval", key))

    @staticmethod
    def restore_eval(entry: dict, out_dir: str, task: str) -> dict:
        """Copy a cached evaluation's result (and per-image file, figures) into ``out_dir``; returns the result."""
        res = ckpt.load_json(entry["result"])
        os.makedirs(out_dir, exist_ok=True)
        figures = {}
        for name, path in (res.get("figures") or {}).items():
            if os.path.exists(path):
                dst = os.path.join(out_dir, os.path.basename(path))
                if os.path.abspath(dst) != os.path.abspath(path):
                    link_or_copy(path, dst)
                figures[name] = dst
        res["figures"] = figures
        if entry.get("per_image"):
            dst = os.path.join(out_dir, os.path.basename(entry["per_image"]))
            if os.path.abspath(dst) != os.path.abspath(entry["per_image"]):
                link_or_copy(entry["per_image"], dst)
            res["per_image_file"] = os.path.basename(dst)
        res["cached_from"] = {k: entry.get(k) for k in ("run_id", "mlflow_run", "key")}
        ckpt.save_json(res, os.path.join(out_dir, f"eval_{task}.json"))
        return res
