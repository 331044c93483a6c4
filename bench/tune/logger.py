"""MLflow from the Tune driver: one nested run per trial (a Tune callback), and the formatting helpers it shares
with the summary."""

from __future__ import annotations

import math
import os
import time

from ray.tune import Callback

from bench import checkpoint as ckpt
from bench.tune.constants import _TUNE_KEYS, OBJECTIVE, PROXY, RELEASE_AFTER_S, RELEASE_WATCH_S, TRIALS_FILE
from bench.tune.placement import release_placement_groups

class TrialLogger(Callback):
    """MLflow from the driver: one nested run per trial, curves as results arrive, status at the end."""

    def __init__(self, info: dict):
        self.info = info  # uri, experiment, parent, dir, name, method, task, fixed, primary
        self._tracker = None
        self._state = None
        self._release: dict | None = None  # trial id -> when it stopped (placement groups to free)
        self._last_release = 0.0

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_tracker"], d["_state"], d["_release"] = None, None, None
        return d

    # ---- helpers
    @property
    def tracker(self):
        if self._tracker is None:
            from bench.tracking import Tracker

            self._tracker = Tracker(self.info["uri"], self.info["experiment"])
        return self._tracker

    @property
    def state(self) -> dict:
        if self._state is None:
            path = os.path.join(self.info["dir"], TRIALS_FILE)
            self._state = ckpt.load_json(path) if os.path.exists(path) else {}
        return self._state

    def _save(self) -> None:
        ckpt.save_json(self.state, os.path.join(self.info["dir"], TRIALS_FILE))

    def _run(self, trial) -> str:
        entry = self.state.setdefault(trial.trial_id, {"step": 0, "proxy": {}, "done": False})
        rid = entry.get("run")
        if rid and self.tracker.run_status(rid) != "MISSING":
            return rid
        i = self.info
        tags = {"bench.kind": "trial", "bench.tune": i["name"], "trial_id": trial.trial_id, "method": i["method"],
                "task": i["task"], "dataset": i["dataset"], "backbone": i["backbone"]}
        rid = self.tracker.start_run(f"{i['name']}-{trial.trial_id}", tags, i["parent"])
        values = {k: v for k, v in trial.config.items() if not k.startswith("_")}
        self.tracker.log_params(rid, {**{f"fixed.{k}": v for k, v in i["fixed"].items()}, **values})
        entry["run"] = rid
        self._save()
        return rid

    # ---- Tune hooks
    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)
        self.state[trial.trial_id]["t_start"] = time.time()  # driver-side wall time of the trial (this attempt)
        self._save()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        rid = self._run(trial)
        entry = self.state[trial.trial_id]
        step = int(result.get("step", 0) or 0)
        numbers = {k: float(v) for k, v in result.items() if k not in _TUNE_KEYS and _finite(v)}
        if OBJECTIVE in result:
            if not entry.get("final"):
                self.tracker.log_metrics(rid, numbers, step=step)
                entry["final"] = True
                self._save()
            return
        if step <= entry["step"]:  # a resumed trial re-reports steps after its last checkpoint
            return
        self.tracker.log_metrics(rid, {f"train/{k}": v for k, v in numbers.items()}, step=step)
        entry["step"] = step
        if PROXY in numbers:
            entry["proxy"][str(step)] = numbers[PROXY]
        self._save()

    # ---- placement groups of stopped trials
    def _release_later(self, trial) -> None:
        if self._release is None:
            self._release = {}
        self._release[trial.trial_id] = time.monotonic()

    def on_step_begin(self, iteration, trials, **info):
        pending = self._release
        if not pending:
            return
        now = time.monotonic()
        if now - self._last_release < 1.0:
            return
        self._last_release = now
        for tid, since in list(pending.items()):
            if now - since >= RELEASE_AFTER_S:
                release_placement_groups(os.path.join(self.info["dir"], "trials", tid))
            if now - since >= RELEASE_WATCH_S:
                pending.pop(tid)

    def on_experiment_end(self, trials, **info):
        for tid in list(self._release or {}):
            release_placement_groups(os.path.join(self.info["dir"], "trials", tid))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release_later(trial)
        rid = self._run(trial)
        last = trial.last_result or {}
        entry = self.state[trial.trial_id]
        if OBJECTIVE in last:
            status = "completed"
            msg = f"{self.info['task']}/{self.info['primary']} {last[OBJECTIVE]:.2f}"
        else:
            status = "early_stopped"
            msg = f"stopped early by ASHA at step {last.get('step', '?')} (proxy {last.get(PROXY, float('nan')):.2f})"
        self.tracker.set_tags(rid, {"tune.status": status, "tune.last_step": last.get("step", "")})
        trial_dir = os.path.join(self.info["dir"], "trials", trial.trial_id)
        if status == "completed" and os.path.isdir(trial_dir):  # the task's figures (e.g. linseg predictions)
            for fname in sorted(os.listdir(trial_dir)):
                if fname.endswith(".png"):
                    self.tracker.log_artifact(rid, os.path.join(trial_dir, fname), "figures")
        self.tracker.finish(rid)
        entry["done"] = True
        entry["status"] = status
        entry["t_end"] = time.time()
        self._save()
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.config.items())
        wall = _trial_wall(entry) or 0.0
        print(f"  trial {trial.trial_id}: {values} -> {msg} ({wall:.0f} s)", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release_later(trial)
        rid = self._run(trial)
        entry = self.state[trial.trial_id]
        err = _trial_error(trial)
        self.tracker.set_tags(rid, {"tune.status": "error", "tune.error": err[:4000]})
        self.tracker.finish(rid, "FAILED")
        entry["done"] = True
        entry["status"] = "error"
        self._save()
        print(f"  trial {trial.trial_id}: failed: {err.splitlines()[-1] if err else '?'}", flush=True)


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        if path and os.path.exists(path):
            with open(path) as fh:
                text = fh.read().strip()
            lines = [ln for ln in text.splitlines() if ln.strip()]
            for ln in reversed(lines):
                if not ln.startswith(" ") and ("Error" in ln or "error" in ln):
                    return ln.strip()
            return lines[-1] if lines else ""
    except OSError:
        pass
    return str(getattr(trial, "error_msg", "") or "")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _trial_wall(entry: dict) -> float | None:
    """Seconds from the trial's (last) start to its end, as the driver saw them (actor start included)."""
    if "t_start" in entry and "t_end" in entry:
        return float(entry["t_end"] - entry["t_start"])
    return None

