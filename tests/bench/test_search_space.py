"""The ``--space`` parser of ``bench tune``: distributions, keys, YAML files, and one clear error per bad input."""

import numpy as np
import pytest
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized, Uniform

from bench.cli import main
from bench.errors import BenchError
from bench.search_space import FUNCTIONS, build_space, describe, parse_expr, valid_keys


def _domain(expr, where="--space test"):
    return parse_expr(expr, where)


def _samples(domain, n=400, seed=0):
    return np.asarray(domain.sample(size=n, random_state=np.random.default_rng(seed)))


# ------------------------------------------------------------------------------------------ distributions


def test_float_distributions_have_their_bounds_and_sampler():
    d = _domain("uniform(0.02, 0.07)")
    assert isinstance(d, Float) and isinstance(d.get_sampler(), Uniform) and (d.lower, d.upper) == (0.02, 0.07)
    d = _domain("loguniform(0.1,10)")
    assert isinstance(d.get_sampler(), LogUniform) and (d.lower, d.upper) == (0.1, 10)
    x = _samples(d)
    assert x.min() >= 0.1 and x.max() <= 10
    # log-uniform on [0.1, 10]: log10 is uniform on [-1, 1], so half the draws are below 1 and a quarter below 10^-0.5
    assert abs((x < 1).mean() - 0.5) < 0.08 and abs((x < 10 ** -0.5).mean() - 0.25) < 0.08
    d = _domain("quniform(0, 1, 0.25)")
    assert isinstance(d.get_sampler(), Quantized) and d.get_sampler().q == 0.25
    assert set(np.round(_samples(d), 6)) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    d = _domain("qloguniform(1e-4, 1e-2, 1e-4)")  # YAML reads 1e-4 as a string: it must still be a number
    assert (d.lower, d.upper, d.get_sampler().q) == (1e-4, 1e-2, 1e-4)


def test_integer_distributions_follow_tune_bounds():
    d = _domain("randint(2, 5)")
    assert isinstance(d, Integer) and set(_samples(d)) == {2, 3, 4}  # upper bound exclusive, as tune.randint
    d = _domain("qrandint(2, 8, 2)")
    assert set(_samples(d)) == {2, 4, 6, 8}  # inclusive, multiples of q
    d = _domain("lograndint(1, 100)")
    x = _samples(d)
    assert x.min() >= 1 and x.max() <= 99 and (x < 10).mean() > 0.35  # log-uniform: ~half below sqrt(100)


def test_choice_values_keep_their_types_and_lists_are_choices():
    d = _domain("choice(adamw, sgd)")
    assert isinstance(d, Categorical) and d.categories == ["adamw", "sgd"]
    assert _domain("choice(true, false)").categories == [True, False]
    assert _domain("choice(4, 6, 8)").categories == [4, 6, 8]
    assert _domain("[0.1, 1e-3]").categories == [0.1, 1e-3]
    assert _domain([3, 5]).categories == [3, 5]  # a YAML list


def test_plain_values_are_fixed():
    from bench.search_space import _FIXED

    assert _domain("0.05") == (_FIXED, 0.05)
    assert _domain("1e-3") == (_FIXED, 1e-3)
    assert _domain("sgd") == (_FIXED, "sgd")
    assert _domain(7) == (_FIXED, 7)


@pytest.mark.parametrize("expr", ["uniform(0.02, 0.07)", "loguniform(0.1, 10)", "quniform(0, 1, 0.25)",
                                  "qloguniform(0.0001, 0.01, 0.0001)", "randint(2, 5)", "qrandint(2, 8, 2)",
                                  "lograndint(1, 100)", "qlograndint(2, 64, 2)", "choice(4, 6, 8)",
                                  "choice(adamw, sgd)", "choice(true, false)"])
def test_describe_writes_the_expression_back(expr):
    d = _domain(expr)
    assert describe(d) == expr
    again = _domain(describe(d))
    assert type(again) is type(d) and describe(again) == expr


def test_every_documented_function_parses():
    two = {"uniform": "(1, 2)", "loguniform": "(1, 2)", "randint": "(1, 3)", "lograndint": "(1, 3)",
           "quniform": "(1, 2, 0.5)", "qloguniform": "(1, 2, 0.5)", "qrandint": "(1, 4, 1)", "qlograndint": "(1, 4, 1)",
           "choice": "(1, 2)"}
    assert set(two) == set(FUNCTIONS)
    for name, args in two.items():
        assert describe(_domain(name + args)).startswith(name)


# ------------------------------------------------------------------------------------------ the space


def test_method_defaults_are_kept_replaced_and_extended():
    space = build_space("dino", ["dino.teacher_temp=loguniform(0.01,0.1)", "pretrain.lr=loguniform(1e-4,1e-3)",
                                 "methods.dino.center_momentum=choice(0.9, 0.95)", "student_temp=0.1"])
    from methods.dino import DINO

    defaults = DINO.search_space()
    assert set(space.domains) == {"dino.teacher_temp", "dino.momentum_teacher", "dino.center_momentum", "pretrain.lr"}
    assert space.text["dino.teacher_temp"] == "loguniform(0.01, 0.1)"  # replaced
    assert space.text["dino.momentum_teacher"] == describe(defaults["momentum_teacher"])  # kept
    assert space.text["dino.center_momentum"] == "choice(0.9, 0.95)"
    assert space.fixed == {"dino.student_temp": 0.1} and "dino.student_temp" not in space.domains
    assert space.overrides({"dino.teacher_temp": 0.03, "pretrain.lr": 2e-4}) == {
        "methods": {"dino": {"student_temp": 0.1, "teacher_temp": 0.03}}, "pretrain": {"lr": 2e-4}}


def test_space_only_and_user_fixed_fields():
    only = build_space("dino", ["pretrain.lr=loguniform(1e-4,1e-3)"], only=True)
    assert list(only.domains) == ["pretrain.lr"]
    # a field the user set with --set is not searched by default (their value stands)
    space = build_space("dino", [], user={"methods": {"dino": {"teacher_temp": 0.05}}, "pretrain": {"lr": 1e-3}})
    assert "dino.teacher_temp" not in space.domains and "dino.student_temp" in space.domains
    assert any("dino.teacher_temp" in n for n in space.notes)
    # ... unless --space names it explicitly
    space = build_space("dino", ["dino.teacher_temp=uniform(0.03,0.05)"],
                        user={"methods": {"dino": {"teacher_temp": 0.05}}})
    assert space.text["dino.teacher_temp"] == "uniform(0.03, 0.05)"


def test_yaml_space_file(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("dino:\n  teacher_temp: loguniform(0.01, 0.1)\n  center_momentum: [0.9, 0.95]\n"
                 "pretrain.lr: {loguniform: [1e-4, 1e-3]}\npretrain:\n  optimizer: choice(adamw, sgd)\n"
                 "methods:\n  dino:\n    student_temp: 0.1\n")
    space = build_space("dino", [str(f)], only=True)
    assert space.text == {"dino.teacher_temp": "loguniform(0.01, 0.1)", "dino.center_momentum": "choice(0.9, 0.95)",
                          "pretrain.lr": "loguniform(0.0001, 0.001)", "pretrain.optimizer": "choice(adamw, sgd)",
                          "dino.student_temp": "= 0.1"}
    # a later CLI entry wins over the file
    space = build_space("dino", [str(f), "dino.teacher_temp=uniform(0.03,0.04)"], only=True)
    assert space.text["dino.teacher_temp"] == "uniform(0.03, 0.04)"


def test_valid_keys_are_the_config_fields():
    import dataclasses

    from methods.dino import DINOConfig

    keys = valid_keys("dino")
    assert [k for k in keys if k.startswith("dino.")] == [f"dino.{f.name}" for f in dataclasses.fields(DINOConfig)]
    assert "pretrain.lr" in keys and "pretrain.epochs" not in keys


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("item,message", [
    ("dino.teacher_tmp=uniform(0.01,0.1)",
     r"unknown hyperparameter 'dino.teacher_tmp'; valid: dino.out_dim, .*dino.teacher_temp"),
    ("croc.lambda_pos=uniform(0,1)", r"unknown hyperparameter 'croc.lambda_pos': this search is over method 'dino'"),
    ("pretrain.epochs=randint(1,3)", r"unknown hyperparameter 'pretrain.epochs'; valid: .*pretrain.lr"),
    ("dino.teacher_temp=loguniform(0.1,0.01)", r"low 0.1 > high 0.01"),
    ("dino.teacher_temp=uniform(0.05,0.05)", r"empty range \[0.05, 0.05\]"),
    ("dino.out_dim=randint(8,8)", r"empty range \[8, 8\)"),
    ("dino.teacher_temp=logunifrom(0.01,0.1)", r"unknown distribution 'logunifrom'; expected uniform\(a,b\)"),
    ("dino.teacher_temp=uniform(0.01,", r"malformed distribution 'uniform\(0.01,'"),
    ("dino.teacher_temp=uniform(0.01)", r"uniform\(\) takes 2 numbers \(uniform\(a, b\)\), got 1"),
    ("dino.teacher_temp=uniform(low,high)", r"uniform\(\) takes numbers, got 'low', 'high'"),
    ("dino.teacher_temp=loguniform(0,1)", r"loguniform\(\) needs low > 0, got 0"),
    ("dino.teacher_temp=quniform(0,1,0)", r"needs a positive step q, got 0"),
    ("dino.out_dim=randint(1.5,8)", r"randint\(\) takes integers"),
    ("dino.out_dim=uniform(8,64)", r"dino.out_dim is an integer; use randint"),
    ("dino.norm_last_layer=uniform(0,1)", r"dino.norm_last_layer is a bool; use choice"),
    ("dino.norm_last_layer=choice(yes_please)", r"\(dino.norm_last_layer\): expected bool, got str 'yes_please'"),
    ("pretrain.optimizer=choice(1, 2)", r"\(pretrain.optimizer\): expected str, got int 1"),
    ("dino.teacher_temp=choice()", r"choice\(\) needs at least one value"),
    ("dino.teacher_temp=choice(0.1, 0.1)", r"lists a value twice"),
    ("dino.out_dim=qrandint(5,7,4)", r"no multiple of the quantization factor"),
    ("dino.teacher_temp=", r"empty value"),
    ("=uniform(0,1)", r"expected KEY=DISTRIBUTION"),
    ("dino.teacher_temp", r"expected KEY=DISTRIBUTION .* or a YAML file"),
    ("missing.yaml", r"--space missing.yaml: file not found"),
])
def test_bad_space_is_one_clear_error(item, message):
    with pytest.raises(BenchError, match=message) as err:
        build_space("dino", [item])
    text = str(err.value)
    assert "\n" not in text and text.startswith("--space ")


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dino: [unclosed\n")
    with pytest.raises(BenchError, match=r"bad.yaml: not valid YAML \(line 2\)"):
        build_space("dino", [str(bad)])
    lst = tmp_path / "list.yaml"
    lst.write_text("- uniform(0,1)\n")
    with pytest.raises(BenchError, match=r"list.yaml: expected a mapping"):
        build_space("dino", [str(lst)])
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("dino:\n  teacher_temp: uniform(0.1, 0.01)\n")
    with pytest.raises(BenchError, match=r"wrong.yaml: dino.teacher_temp: low 0.1 > high 0.01"):
        build_space("dino", [str(wrong)])


def test_nothing_to_search():
    with pytest.raises(BenchError, match=r"nothing to search \(--space-only with no distribution"):
        build_space("dino", ["dino.teacher_temp=0.05"], only=True)


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("argv,message", [
    (["tune", "--method", "dino", "--trials", "0"], "error: --trials 0: expected at least 1 trial"),
    (["tune", "--method", "dino", "--space", "dino.teacher_tmp=uniform(0,1)"],
     "error: --space dino.teacher_tmp=uniform(0,1): unknown hyperparameter 'dino.teacher_tmp'; valid: dino.out_dim,"),
    (["tune", "--method", "dino", "--space", "dino.teacher_temp=uniform(0.1,0.01)"],
     "error: --space dino.teacher_temp=uniform(0.1,0.01): low 0.1 > high 0.01"),
    (["tune", "--method", "dino", "--space", "dino.teacher_temp=gauss(0,1)"],
     "error: --space dino.teacher_temp=gauss(0,1): unknown distribution 'gauss'"),
    (["tune", "--method", "nosuch"], "error: --method: unknown"),
    (["tune", "--method", "dino,croc"], "error: --method dino,croc: a search tunes one method"),
    (["tune", "--trials", "3"], "error: --method: required"),
    (["tune", "--method", "dino", "--concurrent", "-1"], "error: --concurrent -1: expected 0"),
    (["tune", "--resume", "nosuch"], "error: --resume nosuch: no search named 'nosuch'"),
    (["tune", "--resume", "x", "--method", "dino"],
     "error: --resume x: continues with the search's own settings; drop --method"),
    (["run", "--from-tune", "nosuch"], "error: --from-tune nosuch: no search named 'nosuch'"),
])
def test_cli_rejects_bad_input_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err
    assert err.count("\n") == 1
    assert not (tmp_path / "bench_runs" / "tune").exists() or not any((tmp_path / "bench_runs" / "tune").iterdir())


def test_space_round_trips_through_its_items():
    """A search stores its resolved space as --space entries; a resume rebuilds exactly the same space."""
    space = build_space("dino", ["pretrain.lr=loguniform(1.234567e-4,1e-3)", "dino.student_temp=0.1234567891",
                                 "pretrain.optimizer=sgd", "dino.out_dim=qrandint(64, 256, 64)"])
    again = build_space("dino", space.as_items(), only=True)
    assert again.text == space.text and again.fixed == space.fixed == {"dino.student_temp": 0.1234567891,
                                                                       "pretrain.optimizer": "sgd"}
    assert again.domains["pretrain.lr"].lower == 1.234567e-4


def test_every_registered_method_has_a_valid_default_space():
    """Each method's search_space() names config fields with distributions the parser can write back."""
    from bench.registry import METHODS

    for method in METHODS.names():
        space = build_space(method)
        assert space.domains and all(k.startswith(f"{method}.") for k in space.domains)
        again = build_space(method, space.as_items(), only=True)
        assert again.text == space.text, method
