import pytest

from bench.errors import BenchError
from bench.registry import BACKBONES, DATASETS, METHODS, TASKS, Registry


def test_round_trip_and_listing():
    reg = Registry("widget")

    @reg.register("b")
    class B:
        pass

    reg.register("a")(int)
    assert reg.get("b") is B and reg.get("a") is int
    assert reg.names() == ["a", "b"] and "a" in reg and "c" not in reg


def test_unknown_name_lists_valid_ones():
    reg = Registry("widget")
    reg.register("alpha")(int)
    with pytest.raises(BenchError, match=r"unknown widget 'beta'; valid: alpha"):
        reg.get("beta")
    with pytest.raises(BenchError, match=r"--widgets: unknown widget 'x', 'y'; valid: alpha"):
        reg.validate(["alpha", "x", "y"], "--widgets")


def test_double_registration_of_a_different_object_fails():
    reg = Registry("widget")
    reg.register("a")(int)
    reg.register("a")(int)  # the same object again (module re-import) is fine
    with pytest.raises(ValueError):
        reg.register("a")(str)


def test_builtin_components_are_registered():
    assert "dino" in METHODS and "linseg" in TASKS and "synthetic" in DATASETS
    assert {"vit_tiny_d4_p8", "vit_small_p16", "resnet50"} <= set(BACKBONES.names())
    for name in METHODS:
        assert hasattr(METHODS.get(name), "config_class")


def test_registries_load_the_plugins_on_first_lookup():
    """A fresh interpreter: no ``load_all()`` call anywhere, the first lookup imports methods/ and tasks/;
    registering does not load (it runs while the plugins load)."""
    import subprocess
    import sys

    code = ("import sys; from bench.registry import METHODS, TASKS, Registry\n"
            "r = Registry('x'); r.register('a')(int)\n"
            "assert 'methods.dino' not in sys.modules, 'imported before any lookup'\n"
            "assert 'dino' in METHODS and 'methods.dino' in sys.modules\n"
            "assert 'linseg' in TASKS.names() and TASKS.get('det').primary == 'bbox_AP'\n"
            "assert 'methods._template' not in sys.modules\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
