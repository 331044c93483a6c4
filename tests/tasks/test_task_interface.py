"""Every registered task implements the one declared ``Task`` interface (signature and hooks)."""

import inspect

import pytest

from bench.registry import TASKS
from tasks.base import Task

NAMES = TASKS.names()


def test_the_task_list_is_not_empty():
    assert {"linseg", "cluster", "det"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_task_has_the_one_evaluate_signature_and_declared_hooks(name):
    cls = TASKS.get(name)
    assert issubclass(cls, Task)
    want = list(inspect.signature(Task.evaluate).parameters)
    assert want == ["self", "features", "data", "device", "backbone"]
    got = inspect.signature(cls.evaluate).parameters
    assert list(got) == want, f"{name}.evaluate{inspect.signature(cls.evaluate)}"
    assert got["backbone"].default is None
    assert isinstance(cls.primary, str) and cls.primary, f"{name}: no primary metric"
    assert isinstance(cls.higher_is_better, bool) and isinstance(cls.needs_backbone, bool)


def test_only_fine_tuning_tasks_need_the_backbone():
    assert TASKS.get("det").needs_backbone and not TASKS.get("linseg").needs_backbone
    assert not TASKS.get("cluster").needs_backbone
