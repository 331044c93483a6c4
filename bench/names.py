"""Names that become paths: run ids, search names, experiment names, output files.

A run id names the folder ``<storage>/<run_id>`` and the files ``results/<run_id>.md|.csv``; a search name the
folder ``<storage>/tune/<name>``; an experiment name the file ``results/leaderboard-<experiment>.md``. Each is
one path component: ``[A-Za-z0-9._-]+``, not ``.`` or ``..``, at most ``MAX_LEN`` characters, so that
``--run-id ../../escape`` cannot write two folders above ``--storage``. Experiment names are MLflow's and may
hold spaces and other punctuation, but never a path separator or a control character.
"""

from __future__ import annotations

import os
import re

from bench.errors import BenchError

MAX_LEN = 128
_ID = re.compile(r"[A-Za-z0-9._-]+")
_EXPERIMENT_BAD = re.compile(r"[/\\\x00-\x1f\x7f]")


def check_id(value: str, option: str, kind: str = "run id") -> str:
    """``value`` if it is a valid one-component name, else BenchError naming ``option``."""
    if not isinstance(value, str) or not value:
        raise BenchError(f"{option}: expected a {kind} ([A-Za-z0-9._-], e.g. 20250101-120000), got {value!r}")
    if not _ID.fullmatch(value) or value in (".", ".."):
        raise BenchError(f"{option} {value}: a {kind} uses letters, digits, '.', '_' and '-' only (it names a folder "
                         f"inside the storage folder), and is not '.' or '..'")
    if len(value) > MAX_LEN:
        raise BenchError(f"{option} {value[:20]}...: a {kind} has at most {MAX_LEN} characters, got {len(value)}")
    return value


def check_experiment(value: str, option: str = "--experiment") -> str:
    if not isinstance(value, str) or not value.strip():
        raise BenchError(f"{option}: expected an MLflow experiment name, got {value!r}")
    if _EXPERIMENT_BAD.search(value) or value in (".", ".."):
        raise BenchError(f"{option} {value!r}: an experiment name holds no '/', '\\' or control characters (it also "
                         f"names results/leaderboard-<experiment>.md)")
    if len(value) > 256:
        raise BenchError(f"{option}: an experiment name has at most 256 characters, got {len(value)}")
    return value


def inside(root: str, name: str, option: str, kind: str = "run id") -> str:
    """``<root>/<name>`` after checking ``name``; the absolute path, guaranteed below ``root``."""
    check_id(name, option, kind)
    base = os.path.abspath(root)
    path = os.path.normpath(os.path.join(base, name))
    if os.path.dirname(path) != base:  # cannot happen for a valid id; kept as the invariant this module promises
        raise BenchError(f"{option} {name}: resolves to {path}, outside {base}")
    return path


def check_output_file(path: str, option: str) -> str:
    """An output file path: not empty, not an existing folder, its folder existing (or creatable by the caller)."""
    if not isinstance(path, str) or not path.strip():
        raise BenchError(f"{option}: expected a file path")
    if "\x00" in path:
        raise BenchError(f"{option}: the path holds a NUL character")
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise BenchError(f"{option} {path}: is a folder; expected a file path, e.g. {os.path.join(path, 'model.pkl')}")
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise BenchError(f"{option} {path}: {probe} is a file, so {folder} cannot be created")
    if not os.access(probe, os.W_OK):
        raise BenchError(f"{option} {path}: {probe} is not writable")
    return path


def check_config_names(run, tracking) -> None:
    """The names in a resolved config (``run.run_id``, ``tracking.experiment``), as ``bench.config`` resolves it."""
    if run.run_id:
        check_id(run.run_id, "--run-id")
    if not isinstance(run.storage, str) or not run.storage.strip():
        raise BenchError("--storage: expected a folder path")
    check_experiment(tracking.experiment)


__all__ = ["check_id", "check_experiment", "inside", "check_output_file", "check_config_names", "MAX_LEN"]
