import os

import pytest

# Ray: no token auth for local test clusters, no usage stats; keep torch from oversubscribing 2 cores.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# Small settings shared by end-to-end tests: a few steps of batch 8 on 64 training images.
TINY_SETS = [
    "pretrain.epochs=1", "pretrain.steps_per_epoch=3", "pretrain.batch_size=8", "pretrain.log_every=1",
    "pretrain.checkpoint_every=2", "data.synthetic.num_train=64", "data.synthetic.num_val=16",
    "tasks.linseg.epochs=2", "tasks.linseg.drop_at=1",
]


def tiny_argv(*extra: str) -> list[str]:
    out = []
    for s in TINY_SETS:
        out += ["--set", s]
    return out + list(extra)
