import pytest
import yaml

from bench.config import load_config, parse_set
from bench.errors import BenchError


def _yaml(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_precedence_defaults_yaml_set_flags(tmp_path):
    defaults = load_config(None, [])
    assert defaults.pretrain.epochs == 3 and defaults.methods["dino"].teacher_temp == 0.04
    f = _yaml(tmp_path, {"pretrain": {"epochs": 5, "batch_size": 16}, "methods": {"dino": {"teacher_temp": 0.06}}})
    from_yaml = load_config(f, [])
    assert from_yaml.pretrain.epochs == 5 and from_yaml.methods["dino"].teacher_temp == 0.06
    both = load_config(f, ["pretrain.epochs=7", "methods.dino.teacher_temp=0.05"])
    assert both.pretrain.epochs == 7 and both.pretrain.batch_size == 16
    assert both.methods["dino"].teacher_temp == 0.05
    flags = load_config(f, ["pretrain.epochs=7"], {"pretrain": {"epochs": 9}})
    assert flags.pretrain.epochs == 9


def test_method_pretrain_defaults_sit_between_defaults_and_user(tmp_path):
    from bench.registry import METHODS

    cls = METHODS.get("dino")
    old = cls.pretrain_defaults
    cls.pretrain_defaults = {"lr": 1e-3, "epochs": 4}
    try:
        cfg = load_config(None, ["pretrain.epochs=2"])
        p = cfg.pretrain_for("dino")
        assert p.lr == 1e-3 and p.epochs == 2
    finally:
        cls.pretrain_defaults = old


def test_ints_are_accepted_for_floats_and_lists_from_commas():
    cfg = load_config(None, ["methods.dino.teacher_temp=1", "run.methods=dino"])
    assert cfg.methods["dino"].teacher_temp == 1.0 and isinstance(cfg.methods["dino"].teacher_temp, float)
    assert cfg.run.methods == ["dino"]


@pytest.mark.parametrize("sets, message", [
    (["pretrain.epochs=ten"], r"pretrain\.epochs: expected int, got str 'ten'"),
    (["pretrain.epoch=3"], r"pretrain: unknown key 'epoch'; valid: epochs"),
    (["methods.nope.x=1"], r"methods: unknown method 'nope'"),
    (["bogus.x=1"], r"unknown section 'bogus'"),
    (["pretrain.gpu=3"], r"pretrain\.gpu: expected bool"),
])
def test_bad_overrides_are_one_clear_line(sets, message):
    with pytest.raises(BenchError, match=message) as err:
        load_config(None, sets)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("item", ["pretrain.epochs", "=3", "pretrain..epochs=3"])
def test_malformed_set(item):
    with pytest.raises(BenchError, match="--set"):
        parse_set([item])


def test_yaml_errors(tmp_path):
    with pytest.raises(BenchError, match=r"pretrain\.epochs: expected int, got str"):
        load_config(_yaml(tmp_path, {"pretrain": {"epochs": "many"}}), [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(BenchError, match=r"bad\.yaml: not valid YAML"):
        load_config(str(bad), [])
    with pytest.raises(BenchError, match="file not found"):
        load_config(str(tmp_path / "missing.yaml"), [])
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(BenchError, match="expected a mapping"):
        load_config(str(lst), [])


def test_unknown_names_in_run_section_are_caught_before_work():
    with pytest.raises(BenchError, match=r"--methods: unknown method 'nope'; valid: .*dino"):
        load_config(None, [], {"run": {"methods": ["dino", "nope"]}})
    with pytest.raises(BenchError, match=r"--tasks: unknown task 'segm'"):
        load_config(None, [], {"run": {"tasks": ["segm"]}})
    with pytest.raises(BenchError, match=r"--data: unknown dataset 'imagenet'"):
        load_config(None, [], {"run": {"data": "imagenet"}})


def test_hash_changes_with_config():
    a = load_config(None, [])
    b = load_config(None, ["pretrain.lr=0.1"])
    assert a.hash() == load_config(None, []).hash() and a.hash() != b.hash()
