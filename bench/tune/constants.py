"""Names shared by the parts of ``bench tune``: its files, its metric keys and its resource constants."""

import re

STATE_FILE = "bench_tune.json"
TRIALS_FILE = "mlflow_trials.json"
BEST_FILE = "best.json"
# Tune's experiment folder inside the search folder: on restore Tune copies its experiment folder to a staging
# folder and uploads it back at every sync, which would overwrite files of ours that lived there
TUNE_DIR = "ray"
OBJECTIVE = "objective"
PROXY = "proxy"

# keys Tune adds to every result: not training curves
_TUNE_KEYS = {"timestamp", "time_this_iter_s", "time_total_s", "training_iteration", "pid", "hostname", "node_ip",
              "date", "done", "trial_id", "iterations_since_restore", "time_since_restore", "checkpoint_dir_name",
              "experiment_tag", "config", "should_checkpoint", "timesteps_total", "episodes_total",
              "timesteps_since_restore", "checkpoint_path", "step", "epoch"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Logical CPUs of a trial's Tune function: it only drives Ray Train (Tune refuses 0). The Train workers and the
# evaluation task take the rest of the trial's share, so a trial's total stays workers × cpus_per_worker.
DRIVER_CPU = 0.01
# A trial stopped by ASHA is killed with its Train controller; the worker group's placement group is scoped to the
# job, and Train's own cleaner needs the State API, which cannot tell which cluster to ask when several local Ray
# instances run on one machine (it then never frees the CPUs and the next trial waits forever). The driver removes
# the placement groups a stopped trial recorded, a few seconds after the stop, and keeps watching for a while in
# case the dying controller started another worker group.
RELEASE_AFTER_S = 3.0
RELEASE_WATCH_S = 120.0
PG_FILE = "placement_groups.txt"
