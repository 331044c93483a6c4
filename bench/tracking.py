"""MLflow tracking: one parent run per ``bench run``, nested runs per pretraining and per evaluation.

Default store: ``sqlite:///<cwd>/mlruns.db`` with artifacts in ``<cwd>/mlartifacts`` (absolute paths, since
Ray workers and Tune trials change their working directory). Every run is tagged ``bench.kind``
(run | pretrain | eval), ``bench.run_id``, ``method``, ``task``, ``dataset``, ``backbone``; evaluation
metrics are named ``<task>/<metric>``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings

from bench.errors import BenchError


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


class Tracker:
    """A thin wrapper around ``MlflowClient`` bound to one experiment."""

    def __init__(self, uri: str = "", experiment: str = "bench", create: bool = True):
        _quiet()
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        if self.uri.startswith("sqlite:///"):
            db = self.uri[len("sqlite:///"):]
            folder = os.path.dirname(db) or "."
            if not create and not os.path.exists(db):
                raise BenchError(f"--tracking-uri {self.uri}: no MLflow store at {db} (run `python -m bench run` first)")
            if create and not os.access(folder, os.W_OK):
                raise BenchError(f"--tracking-uri {self.uri}: folder {folder} is not writable")
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
        except Exception as exc:
            raise BenchError(f"--tracking-uri {self.uri}: cannot open the MLflow store ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160]})") from None
        if exp is None:
            if not create:
                raise BenchError(f"--experiment {experiment}: no such experiment in {self.uri}")
            location = None
            if self.uri.startswith("sqlite:///"):
                root = os.path.join(os.path.dirname(self.uri[len("sqlite:///"):]), "mlartifacts")
                location = "file://" + os.path.abspath(root)
            exp_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        self.experiment = experiment
        self.experiment_id = exp_id

    # ---- runs
    def start_run(self, name: str, tags: dict, parent: str | None = None) -> str:
        tags = {k: str(v) for k, v in tags.items()}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def find_runs(self, filter_string: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=5000)

    def run_status(self, run_id: str) -> str:
        try:
            return self.client.get_run(run_id).info.status
        except Exception:
            return "MISSING"

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        existing = self.client.get_run(run_id).data.params
        flat = [p for p in flat if p.key not in existing]
        for i in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        rows = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(rows), 1000):
            self.client.log_batch(run_id, metrics=rows[i:i + 1000])

    def log_curves(self, run_id: str, rows: list[dict], keys: list[str] | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        out = []
        for r in rows:
            for k, v in r.items():
                if k in ("step", "epoch") or (keys and k not in keys):
                    continue
                out.append(Metric(f"train/{k}", float(v), ts, int(r["step"])))
        for i in range(0, len(out), 1000):
            self.client.log_batch(run_id, metrics=out[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

    def log_table(self, run_id: str, df, artifact_file: str) -> None:
        self.client.log_table(run_id, data=df, artifact_file=artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_image_bytes(self, run_id: str, png: bytes, artifact_file: str) -> None:
        import io

        from PIL import Image

        self.client.log_image(run_id, Image.open(io.BytesIO(png)), artifact_file=artifact_file)
