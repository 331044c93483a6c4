"""MLflow tracking: one parent run per ``bench run``, nested runs per pretraining and per evaluation.

Default store: ``sqlite:///<cwd>/mlruns.db`` with artifacts in ``<cwd>/mlartifacts`` (absolute paths, since
Ray workers and Tune trials change their working directory). Every run is tagged ``bench.kind``
(run | pretrain | eval), ``bench.run_id``, ``method``, ``task``, ``dataset``, ``backbone``; evaluation
metrics are named ``<task>/<metric>``.

This module owns the MLflow schema: the tag vocabulary (``TAG``, :func:`run_tags`), and the resumable run ledger
(:class:`RunLedger`, ``<run dir>/mlflow.json``) that lets a re-run reuse its runs instead of logging twice.
The store may fail mid-run (locked, full, removed, a server outage): the :class:`Tracker` then goes *offline*,
says why once, and every later call is a no-op, so pretraining and evaluation finish with their results in the
run folder; re-running the same command logs them (the ledger knows what was not logged).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import time
import warnings

from bench.errors import BenchError


# ---- the tag vocabulary: every run bench writes carries these keys (readers use the same names)
TAG = {
    "kind": "bench.kind",  # run | pretrain | eval | tune | trial
    "run_id": "bench.run_id",
    "method": "method", "task": "task", "dataset": "dataset", "pretrain_dataset": "pretrain_dataset",
    "backbone": "backbone", "init": "bench.init", "recipe": "recipe", "recipe_hash": "recipe_hash",
    "recipe_changes": "recipe_changes", "seed": "bench.seed",
    "primary": "bench.primary", "protocol": "bench.protocol", "protocol_name": "bench.protocol_name",
    "protocol_version": "bench.protocol_version", "protocol_hash": "bench.protocol_hash",
    "data_hash": "bench.data_hash", "baseline": "bench.baseline", "git_commit": "git_commit",
    "code_version": "bench.code_version", "config_hash": "config_hash", "cache": "bench.cache",
    "cached_from": "bench.cached_from", "cache_key": "bench.cache_key", "checkpoint_hash": "bench.checkpoint_hash",
    "tune": "bench.tune", "trial_id": "trial_id",  # `bench tune`: the search's parent run and its trials
}


def run_tags(kind: str, run_id: str | None, **fields) -> dict:
    """Tags of one run: ``kind`` and ``run_id`` (a bench run's; None for a search) plus any ``TAG`` field
    (unknown names are a bug: KeyError), with the commit also under ``mlflow.source.git.commit`` (shown on the
    MLflow UI's run page). ``bench tune`` uses it as ``run_tags("trial", None, tune=name, trial_id=..., ...)``."""
    tags = {TAG["kind"]: kind}
    if run_id:
        tags[TAG["run_id"]] = run_id
    tags[TAG["git_commit"]] = fields.pop("git_commit", None) or git_commit()
    tags["mlflow.source.git.commit"] = tags[TAG["git_commit"]]
    for name, value in fields.items():
        if value is not None:
            tags[TAG[name]] = str(value)
    return tags


def default_uri() -> str:
    return f"sqlite:///{os.path.abspath('mlruns.db')}"


def resolve_uri(uri: str) -> str:
    if not uri:
        return default_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # make relative sqlite paths absolute (trials and workers change cwd)
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if "://" not in uri:  # a bare path to a .db file
        return "sqlite:///" + os.path.abspath(uri)
    return uri


def _quiet() -> None:
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="mlflow")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # a tracking server that is down is noticed within about half a minute (MLflow's default retries ~2 min),
    # after which the run goes on offline and keeps its results in the run folder
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_lock(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database is busy" in text


def _store_errors() -> tuple:
    """Exceptions that mean the store cannot be written (not a bug in the caller)."""
    from mlflow.exceptions import MlflowException

    errors: list = [MlflowException, OSError]
    try:
        import sqlalchemy.exc

        errors.append(sqlalchemy.exc.SQLAlchemyError)
    except ImportError:  # pragma: no cover - sqlalchemy ships with mlflow
        pass
    try:
        import requests

        errors.append(requests.exceptions.RequestException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _forget_store(uri: str) -> None:
    """Drop MLflow's in-process caches of a sqlite store whose file is gone, so that a store created again at
    the same path (after it was removed mid-run) is opened afresh instead of through a stale connection."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()
        type(_tracking_store_registry)._get_store_with_resolved_uri.cache_clear()
    except (ImportError, AttributeError):  # other MLflow internals: a new process opens it afresh anyway
        pass


class Tracker:
    """A thin wrapper around ``MlflowClient`` bound to one experiment.

    A call that fails because the store cannot be written is retried while sqlite says "locked" (another
    process is writing; up to ``BENCH_MLFLOW_LOCK_WAIT_S``, default 60 s), otherwise the tracker goes offline:
    ``offline`` holds the one-line reason, ``on_offline(reason)`` is called once, and every call from then on
    returns None without touching the store.
    """

    def __init__(self, uri: str = "", experiment: str = "bench", create: bool = True, on_offline=None):
        _quiet()
        import mlflow
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic", "sqlalchemy"):  # after the import, which sets its own levels
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self.uri = resolve_uri(uri)
        self.offline = ""
        self.on_offline = on_offline
        self.lock_wait_s = float(os.environ.get("BENCH_MLFLOW_LOCK_WAIT_S", "60"))
        if self.uri.startswith("sqlite:///"):
            db = self.uri[len("sqlite:///"):]
            folder = os.path.dirname(db) or "."
            if not create and not os.path.exists(db):
                raise BenchError(f"--tracking-uri {self.uri}: no MLflow store at {db} (run `python -m bench run` first)")
            if create and not os.access(folder, os.W_OK):
                raise BenchError(f"--tracking-uri {self.uri}: folder {folder} is not writable")
            if not os.path.exists(db):
                _forget_store(self.uri)
        mlflow.set_tracking_uri(self.uri)
        last: Exception | None = None
        for attempt in range(8):  # two processes creating one new sqlite store race on its tables: retry
            try:
                self.client = MlflowClient(tracking_uri=self.uri)
                exp_id = self._experiment(experiment, create)
                break
            except BenchError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported below as one line
                last = exc
                time.sleep(0.5 * (attempt + 1))
        else:
            raise BenchError(f"--tracking-uri {self.uri}: cannot open the MLflow store ({type(last).__name__}: "
                             f"{str(last).splitlines()[0][:160] if str(last) else ''})") from None
        self.experiment = experiment
        self.experiment_id = exp_id

    def _experiment(self, experiment: str, create: bool) -> str:
        exp = self.client.get_experiment_by_name(experiment)
        if exp is not None:
            return exp.experiment_id
        if not create:
            raise BenchError(f"--experiment {experiment}: no such experiment in {self.uri}")
        location = None
        if self.uri.startswith("sqlite:///"):
            root = os.path.join(os.path.dirname(self.uri[len("sqlite:///"):]), "mlartifacts")
            location = "file://" + os.path.abspath(root)
        try:
            return self.client.create_experiment(experiment, artifact_location=location)
        except Exception:  # created by a concurrent process in between
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            return exp.experiment_id

    # ---- every store call goes through here
    def _call(self, fn, *args, **kwargs):
        if self.offline:
            return None
        errors = _store_errors()
        deadline = time.monotonic() + self.lock_wait_s
        delay = 0.2
        while True:
            try:
                return fn(*args, **kwargs)
            except errors as exc:
                if _is_lock(exc) and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                self._go_offline(exc)
                return None

    def _go_offline(self, exc: BaseException) -> None:
        root = exc
        for _ in range(10):  # the innermost cause says what happened (MLflow and SQLAlchemy wrap it)
            nxt = root.__cause__ or root.__context__
            if nxt is None or nxt is root:
                break
            root = nxt
        first = (str(root).strip().splitlines() or [type(root).__name__])[0][:200]
        self.offline = f"{type(root).__name__}: {first}"
        if self.on_offline:
            self.on_offline(self.offline)

    # ---- runs
    def start_run(self, name: str, tags: dict, parent: str | None = None) -> str | None:
        tags = {k: str(v) for k, v in tags.items()}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self._call(self.client.create_run, self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id if run is not None else None

    def find_runs(self, filter_string: str) -> list:
        out = self._call(self.client.search_runs, [self.experiment_id], filter_string=filter_string, max_results=5000)
        return list(out or [])

    def run_status(self, run_id: str) -> str:
        """FINISHED | RUNNING | FAILED | KILLED, or MISSING (no such run, or deleted); OFFLINE when the store is."""
        if self.offline:
            return "OFFLINE"
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - a run id from another store
            return "MISSING"
        return "MISSING" if run.info.lifecycle_stage == "deleted" else run.info.status

    def delete_run(self, run_id: str) -> None:
        self._call(self.client.delete_run, run_id)

    def finish(self, run_id: str | None, status: str = "FINISHED") -> None:
        if run_id:
            self._call(self.client.set_terminated, run_id, status=status)

    def log_params(self, run_id: str | None, params: dict) -> None:
        from mlflow.entities import Param

        if not run_id or self.offline:
            return
        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        run = self._call(self.client.get_run, run_id)
        existing = run.data.params if run is not None else {}
        flat = [p for p in flat if p.key not in existing]
        for i in range(0, len(flat), 100):
            self._call(self.client.log_batch, run_id, params=flat[i:i + 100])

    def log_metrics(self, run_id: str | None, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        if not run_id:
            return
        ts = int(time.time() * 1000)
        rows = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(rows), 1000):
            self._call(self.client.log_batch, run_id, metrics=rows[i:i + 1000])

    def log_curves(self, run_id: str | None, rows: list[dict], keys: list[str] | None = None) -> None:
        from mlflow.entities import Metric

        if not run_id:
            return
        ts = int(time.time() * 1000)
        out = []
        for r in rows:
            for k, v in r.items():
                if k in ("step", "epoch") or (keys and k not in keys):
                    continue
                out.append(Metric(f"train/{k}", float(v), ts, int(r["step"])))
        for i in range(0, len(out), 1000):
            self._call(self.client.log_batch, run_id, metrics=out[i:i + 1000])

    def set_tags(self, run_id: str | None, tags: dict) -> None:
        if run_id:
            for k, v in tags.items():
                self._call(self.client.set_tag, run_id, k, str(v))

    def log_artifact(self, run_id: str | None, path: str, artifact_path: str | None = None) -> None:
        if run_id:
            self._call(self.client.log_artifact, run_id, path, artifact_path)

    def log_dict(self, run_id: str | None, data: dict, artifact_file: str) -> None:
        if run_id:
            self._call(self.client.log_dict, run_id, data, artifact_file)

    def log_table(self, run_id: str | None, df, artifact_file: str) -> None:
        if run_id:
            self._call(self.client.log_table, run_id, data=df, artifact_file=artifact_file)

    def log_text(self, run_id: str | None, text: str, artifact_file: str) -> None:
        if run_id:
            self._call(self.client.log_text, run_id, text, artifact_file)

    def log_image_bytes(self, run_id: str | None, png: bytes, artifact_file: str) -> None:
        import io

        from PIL import Image

        if run_id:
            self._call(self.client.log_image, run_id, Image.open(io.BytesIO(png)), artifact_file=artifact_file)

    def download(self, run_id: str, path: str, dst: str) -> str | None:
        """Local copy of an artifact (None when missing or the store is offline)."""
        from mlflow.artifacts import download_artifacts

        try:
            return download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst, tracking_uri=self.uri)
        except Exception:  # noqa: BLE001 - a row without per-image statistics: no significance mark
            return None


class RunLedger:
    """The MLflow run of each stage of one bench run (``<run dir>/mlflow.json``, written atomically), so a re-run
    reuses them: ``stage`` returns (run id, already logged). A stage run left unfinished by an earlier attempt
    (interrupted, or the store failed while logging it) is replaced, so nothing is logged twice; the parent
    run (``key="parent"``) is reused as it is. With the store offline, ``stage`` returns (None, False)."""

    def __init__(self, run_dir: str, tracker: Tracker):
        from bench import checkpoint as ckpt

        self._ckpt = ckpt
        self.tracker = tracker
        self.path = os.path.join(run_dir, "mlflow.json")
        self.ids: dict = ckpt.load_json(self.path) if os.path.exists(self.path) else {}

    def get(self, key: str) -> str | None:
        return self.ids.get(key)

    def stage(self, key: str, name: str, tags: dict, parent: str | None = None) -> tuple[str | None, bool]:
        rid = self.ids.get(key)
        if rid:
            status = self.tracker.run_status(rid)
            if status == "OFFLINE":
                return None, False
            if status == "FINISHED":
                return rid, True
            if status != "MISSING":
                if key == "parent":
                    return rid, False
                self.tracker.delete_run(rid)
        rid = self.tracker.start_run(name, tags, parent)
        if rid:
            self.ids[key] = rid
            self._ckpt.save_json(self.ids, self.path)
        return rid, False

    def unlogged(self) -> list[str]:
        """Stages whose run is not FINISHED in the store (what a re-run will log)."""
        return [k for k, rid in self.ids.items() if self.tracker.run_status(rid) != "FINISHED"]
