"""The global torch RNG of the training process, independent of where the views are built.

``SeededViews`` reseeds the global generator for every sample, so with the views built in the training process
(``pretrain.loader_workers`` 0) the training step starts from the generator state that the batch's last sample
left behind, and methods that draw from the global generator in their step (queues, crop choices) depend on it.
Built in DataLoader worker processes, that state stays in the worker. ``RngCollate`` returns it with the batch
and ``restore`` sets it in the training process: the same state either way, so ``loader_workers`` changes speed
only, never the numbers.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class RngCollate:
    """``collate_fn`` wrapper: (collated batch, global torch RNG state after the batch's samples)."""

    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, samples: list) -> tuple[Any, torch.Tensor]:
        return self.collate(samples), torch.get_rng_state()


def restore(item: tuple[Any, torch.Tensor]) -> Any:
    """The batch of an ``RngCollate`` item, after setting this process's global torch RNG to the item's state."""
    batch, state = item
    torch.set_rng_state(state)
    return batch
