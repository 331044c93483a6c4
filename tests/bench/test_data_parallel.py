"""Data-parallel correctness: 2 Ray Train CPU workers == 1 process on the same global batch, per method."""

import pytest
import torch

from bench.registry import METHODS
from tests.support import data_parallel, single_process


# Small but real configs: every method's cross-sample statistics must be all-reduced to pass.
CONFIGS = {name: {} for name in METHODS.names()}
assert {"dino", "vice", "leopart", "clove", "croc"} <= set(CONFIGS), CONFIGS
N_IMAGES = 4


@pytest.fixture(scope="module")
def distributed():
    res = data_parallel(CONFIGS, N_IMAGES, workers=2, seed=0)
    yield res
    import ray

    ray.shutdown()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_two_workers_match_one_process(method, distributed):
    ref = single_process(method, CONFIGS[method], N_IMAGES, seed=0)
    got = distributed[method]
    assert abs(got["loss"] - ref["loss"]) <= 1e-4 * max(1.0, abs(ref["loss"])), (got["loss"], ref["loss"])
    assert set(got["grads"]) == set(ref["grads"])
    # float32 sums in a different order: tolerances relative to the largest gradient of the model
    scale = max(g.abs().max().item() for g in ref["grads"].values())
    for name, g in ref["grads"].items():
        assert torch.allclose(got["grads"][name], g, atol=1e-5 * scale + 1e-7, rtol=1e-3), name
