"""``bench tune``: hyperparameter search with Ray Tune, Optuna's TPE and ASHA early stopping.

One search = ``--trials`` trials of one (method, task). Each trial:

1. pretrains through the same ``bench.pretrain.train_loop`` as ``bench run``: a single-worker trial (the default)
   runs the loop in a thread of its own process (``bench.tune.inprocess``: no worker group, no second actor, no
   per-trial Ray Train start), a multi-worker trial through a Ray Train ``TorchTrainer`` built inside the trial
   (the Ray Train V2 pattern: a Tune function trainable owns the trainer and forwards its reports with
   ``TuneReportCallback``); every ``pretrain.proxy_every`` steps rank 0 reports a held-out proxy score
   (``proxy``, bench/proxy.py) that ASHA compares across trials;
2. evaluates the task with ``bench.evaluate.evaluate_method`` (in the trial's process when it trained there, else
   a Ray task with the trial's CPUs/GPU) and reports the task's primary metric as ``objective``, the search
   objective.

Search: ``OptunaSearch`` (TPE, seeded with ``run.seed``; the method's default config is the first point when it
lies in the space) behind a ``ConcurrencyLimiter`` (``--concurrent``, default: as many trials as the cluster's
CPUs/GPUs hold); ``ASHAScheduler`` on ``proxy`` with the step as its time axis, grace period
``proxy_every`` and rungs strictly before the last step (a trial that reached the end is never stopped before
its evaluation). Without ``--set pretrain.proxy_every`` the proxy runs every quarter of the pretraining.

Files, under ``<run.storage>/tune/<name>/``:
    ray/                   Tune's experiment folder (kept apart: Tune re-uploads its folder's files on resume)
    bench_tune.json        the search's settings and config (``--resume`` rebuilds everything from it)
    mlflow_trials.json     trial id -> MLflow run id, logged steps and proxy history (resume: nothing logged twice)
    trials/<trial_id>/     the trial's pretraining (checkpoints, metrics.jsonl, final.pt), eval_<task>.json and
                           attempts.jsonl (one line per start: a finished trial is never started again)
    train/                 Ray Train's run folders of the trials
    trials.csv, best.json  the summary; ``bench run --from-tune <name>`` reads best.json
Resources: a single-worker trial reserves its whole share (``pretrain.cpus_per_worker`` CPUs, one GPU with
``pretrain.gpu``) and trains and evaluates itself; a multi-worker trial's Tune function only drives Ray Train and
reserves 0.01 CPU, its Train workers and its evaluation take the rest of its share (``pretrain.workers`` ×
``pretrain.cpus_per_worker``). The driver frees the placement group of a trial that ASHA stopped (see
``release_placement_groups``).
Resume: ``bench tune --resume <name>`` = ``Tuner.restore``: finished trials are kept, interrupted ones restart
and continue their pretraining from its last checkpoint, the TPE sampler keeps its history, and ASHA's rungs are
refilled from the finished trials' proxy history (Tune does not save scheduler state).

MLflow: a parent run (``bench.kind=tune``) with the settings, the space and the summary (trials table
``tune/trials.json``, ``tune/best_config.json``, Optuna's parameter importances, ``tune/optimization_history.png``
and ``tune/param_importances.png``); one nested run per trial (``bench.kind=trial``) with its sampled values as
params, the training curves (``train/*``, including ``train/proxy``), the final ``objective`` and task metrics,
and a ``tune.status`` tag: completed, early_stopped or error. All MLflow writes happen in the driver (a Tune
callback), so a trial that ASHA stops is still closed properly.


Modules: ``options`` (options, resource planning), ``schedulers`` (Optuna/ASHA), ``logger`` (the MLflow callback),
``placement`` (placement-group clean-up), ``trial`` (one trial), ``inprocess`` (a trial's loop in its own process), ``search`` (the search and its entry points),
``summary`` (trials table, best config), ``plots`` (Optuna's importances and plots), ``from_tune`` (``--from-tune``).
"""

from bench.tune.constants import (BEST_FILE, DRIVER_CPU, OBJECTIVE, PG_FILE, PROXY, RELEASE_AFTER_S, RELEASE_WATCH_S,
                                  STATE_FILE, TRIALS_FILE, TUNE_DIR)
from bench.tune.from_tune import apply_from_tune, load_best
from bench.tune.logger import TrialLogger
from bench.tune.options import TuneOptions, check_options, plan_resources, search_dir
from bench.tune.placement import release_placement_groups
from bench.tune.plots import optuna_summary
from bench.tune.schedulers import BenchASHA, BenchOptunaSearch
from bench.tune.search import Search, new_search, resume_search
from bench.tune.trial import apply_values, run_trial, train_worker

__all__ = ["BEST_FILE", "DRIVER_CPU", "OBJECTIVE", "PG_FILE", "PROXY", "RELEASE_AFTER_S", "RELEASE_WATCH_S",
           "STATE_FILE", "TRIALS_FILE", "TUNE_DIR", "BenchASHA", "BenchOptunaSearch", "Search", "TrialLogger",
           "TuneOptions", "apply_from_tune", "apply_values", "check_options", "load_best", "new_search",
           "optuna_summary", "plan_resources", "release_placement_groups", "resume_search", "run_trial", "search_dir",
           "train_worker"]
