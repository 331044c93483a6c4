"""The searcher and the scheduler of ``bench tune``: Optuna's TPE that learns only from final results, and ASHA
whose rungs are refilled from the trials' proxy history after a resume."""

from __future__ import annotations

import os

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from bench import checkpoint as ckpt

class BenchOptunaSearch(OptunaSearch):
    """Only a trial's final result carries the objective; intermediate (proxy) results are ASHA's."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


class BenchASHA(ASHAScheduler):
    """ASHA whose rungs are refilled, after a resume, from the proxy history of the trials finished before it
    (Tune restores the scheduler as it was pickled at the start of the search, with empty rungs)."""

    def __init__(self, history_path: str, **kwargs):
        super().__init__(**kwargs)
        self._history_path = history_path
        self._replayed = False

    def _replay(self) -> None:
        if self._replayed:
            return
        self._replayed = True
        if not os.path.exists(self._history_path):
            return
        history = ckpt.load_json(self._history_path)
        try:  # private ASHA bookkeeping (ray 2.60); if it changes, resumed rungs just start empty
            for tid, h in history.items():
                if not h.get("done"):
                    continue
                proxies = sorted((int(s), float(v)) for s, v in (h.get("proxy") or {}).items())
                for bracket in self._brackets:
                    for milestone, recorded in bracket._rungs:
                        hit = [v for s, v in proxies if s >= milestone]
                        if hit and tid not in recorded:
                            recorded[tid] = self._metric_op * hit[0]
        except AttributeError:
            pass

    def on_trial_add(self, tune_controller, trial):
        self._replay()
        return super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._replay()
        return super().on_trial_result(tune_controller, trial, result)

