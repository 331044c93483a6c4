"""Every registered method declares the ``Method`` hooks the loop reads (no ``getattr`` lookups)."""

import pytest

from bench.registry import METHODS
from methods.base import Method

NAMES = METHODS.names()


def test_the_method_list_is_not_empty():
    assert {"dino", "clove", "croc", "leopart", "vice"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_method_declares_the_hooks(name):
    cls = METHODS.get(name)
    assert issubclass(cls, Method)
    assert isinstance(cls.sync_bn, bool)
    assert isinstance(tuple(cls._ddp_params_and_buffers_to_ignore), tuple)
    assert isinstance(cls.pretrain_defaults, dict)
    assert cls.config_class is not object, f"{name}: no config_class"


def test_base_defaults():
    assert Method.sync_bn is False and tuple(Method._ddp_params_and_buffers_to_ignore) == ()
