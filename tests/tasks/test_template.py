"""tasks/_template.py is not registered by default, and works as a task once registered."""

import importlib
import inspect

import pytest
import torch
from torch.nn import functional as F

from bench.config import build
from bench.registry import TASKS
from tasks.base import EvalData, Task

COLOURS = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)  # class -> image colour


def _split(n, seed):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        cells = torch.randint(0, 3, (4, 4), generator=g)  # 4×4 cells of 8×8 pixels
        mask = cells.repeat_interleave(8, 0).repeat_interleave(8, 1)  # 32×32
        mask[:8, :8] = 255  # one ignored cell
        image = COLOURS[mask.clamp_max(2)].permute(2, 0, 1).contiguous()
        items.append({"image": image, "mask": mask})
    return items


@pytest.fixture
def template():
    mod = importlib.import_module("tasks._template")
    assert "prototype" not in TASKS
    TASKS.register("prototype")(mod.PrototypeSegmentation)
    try:
        yield mod
    finally:
        TASKS.unregister("prototype")


def test_registered_template_task_scores_separable_and_constant_features(template):
    cls = TASKS.get("prototype")
    assert issubclass(cls, Task) and list(inspect.signature(cls.evaluate).parameters) == \
        list(inspect.signature(Task.evaluate).parameters)
    TASKS.validate(["prototype"], "--tasks")
    data = EvalData("toy", _split(6, 0), _split(4, 1), 3, ["r", "g", "b"])
    task = cls(build(cls.config_class, {"batch_size": 4}, "tasks.prototype"))
    res = task.evaluate(lambda x: F.avg_pool2d(x, 8), data, torch.device("cpu"))  # the colour of each cell
    assert res.metrics["miou"] == pytest.approx(100.0) and res.metrics["pixel_acc"] == pytest.approx(100.0)
    const = task.evaluate(lambda x: torch.ones(x.shape[0], 3, 4, 4), data, torch.device("cpu"))
    # every cell gets one class: its IoU is its pixel share, the other two are 0 -> mIoU well below 100
    assert const.metrics["miou"] < 40.0 and len(const.per_class["iou"]) == 3
