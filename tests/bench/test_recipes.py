"""Recipe selection, precedence, user recipe files, the paper comparison, --print-config, the recipe commands,
range checks (issues 17 and 22)."""

import textwrap

import pytest
import yaml

from bench import recipe_tools, recipes
from bench.cli import main
from bench.config import load_config, resolve
from bench.errors import BenchError


def _cfg(methods=("dino",), sets=(), **run):
    return load_config(None, list(sets), {"run": {"methods": list(methods), **run}})


# ------------------------------------------------------------------------------------------- selection

def test_default_is_cpu_on_synthetic_and_paper_on_real_data():
    assert {m: r.name for m, r in _cfg(["dino", "croc"]).recipes.items()} == {"dino": "cpu", "croc": "cpu"}
    real = _cfg(["dino", "croc"], data="voc12")  # resolution does not read the dataset
    assert {m: r.name for m, r in real.recipes.items()} == {"dino": "paper", "croc": "paper"}
    assert real.pretrain_for("dino").epochs == 300 and real.methods["croc"].global_size == 224
    assert _cfg(data="voc12", recipe="cpu").recipes["dino"].name == "cpu"
    assert _cfg(pretrain_data="coco_images", eval_data="voc12").recipes["dino"].name == "paper"


def test_named_variant_and_unknown_name():
    assert _cfg(recipe="vanilla").pretrain_for("dino").epochs == 100
    with pytest.raises(BenchError, match="method 'dino' has no such recipe; valid: paper, cpu, vanilla"):
        _cfg(recipe="nope")


def test_precedence_defaults_recipe_config_set_flags(tmp_path):
    """defaults (3) < method pretrain_defaults (5) < recipe (300) < --config (7) < --set (8) < flags (9)."""
    assert load_config(None, [], {"run": {"methods": ["dino"], "recipe": "cpu"}}).pretrain_for("dino").epochs == 5
    assert load_config(None, [], {"run": {"methods": ["dino"], "recipe": "paper"}}).pretrain_for("dino").epochs == 300
    conf = tmp_path / "c.yaml"
    conf.write_text("run: {methods: [dino], recipe: paper}\npretrain: {epochs: 7}\nmethods: {dino: {n_local: 4}}\n")
    c = load_config(str(conf), [], None)
    assert c.pretrain_for("dino").epochs == 7 and c.methods["dino"].n_local == 4 and c.methods["dino"].out_dim == 65536
    assert load_config(str(conf), ["pretrain.epochs=8"], None).pretrain_for("dino").epochs == 8
    assert load_config(str(conf), ["pretrain.epochs=8"], {"pretrain": {"epochs": 9}}).pretrain_for("dino").epochs == 9
    assert load_config(str(conf), ["run.recipe=cpu"], None).pretrain_for("dino").epochs == 7  # --set picks the recipe


def test_lr_rule_scales_with_the_batch():
    assert _cfg(recipe="paper").pretrain_for("dino").lr == pytest.approx(0.0005 * 1024 / 256)
    assert _cfg(recipe="paper", sets=["pretrain.batch_size=64"]).pretrain_for("dino").lr == pytest.approx(0.000125)
    clove = _cfg(["clove"], recipe="paper", sets=["pretrain.batch_size=256"]).pretrain_for("clove")
    assert (clove.lr, clove.min_lr, clove.lr_ref_batch, clove.min_lr_ratio) == (1.0, 0.01, 0, 0.0)
    assert clove.resolved() == clove  # idempotent: a worker rebuilding it does not scale twice


def test_per_method_backbones_from_their_recipes():
    c = _cfg(["croc", "clove"], recipe="paper")
    assert (c.backbone_for("croc").name, c.backbone_for("clove").name) == ("vit_small_p16", "resnet50")
    assert c.backbone.name == "vit_small_p16"  # the baseline row's: the first method's
    c = _cfg(["croc", "clove"], recipe="paper", sets=["backbone.name=vit_tiny_p16"])
    assert {c.backbone_for(m).name for m in ("croc", "clove")} == {"vit_tiny_p16"}


# ---------------------------------------------------------------------------------------- user files

def _write(tmp_path, body: str, name="my.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_user_recipe_file_for_one_method(tmp_path):
    path = _write(tmp_path, """
        method: dino
        recipes:
          mine:
            extends: cpu
            values:
              methods.dino.n_local: {value: 4, source: my notebook}
              pretrain.epochs: 6
        """)
    # 'extends' only sees the file's own recipes
    with pytest.raises(BenchError, match="extends: 'cpu' is not a recipe of this file"):
        _cfg(recipe=path)
    path = _write(tmp_path, """
        method: dino
        recipes:
          mine:
            values:
              methods.dino.n_local: {value: 4, source: my notebook}
              pretrain.epochs: 6
        """)
    c = _cfg(["dino", "croc"], recipe=f"{path},cpu")
    assert c.recipes["dino"].label == "my:mine" and c.recipes["croc"].name == "cpu"
    assert c.methods["dino"].n_local == 4 and c.pretrain_for("dino").epochs == 6
    assert c.methods["dino"].out_dim == 1024  # unset: defaults
    with pytest.raises(BenchError, match="is a recipe for 'dino', which is not in --methods"):
        _cfg(["croc"], recipe=path)


@pytest.mark.parametrize("values, message", [
    ("{pretrain.workers: 4}", "'pretrain.workers' is a setting of the machine or the run"),
    ("{methods.croc.n_tokens: 3}", "a dino recipe sets only methods.dino.<field>"),
    ("{run.seed: 3}", "only methods.dino.<field>, pretrain.<field> and backbone.<field>"),
    ("{pretrain.lr: -1}", r"recipe my:x \(.*my.yaml\): pretrain.lr = -1.0: expected > 0"),
    ("{methods.dino.teacher_temp: hot}", r"recipe my:x \(.*my.yaml\): methods.dino.teacher_temp: expected float"),
    ("{methods.dino.nope: 1}", "methods.dino: unknown key 'nope'"),
])
def test_bad_user_recipe_is_one_line_naming_the_file(tmp_path, values, message):
    assert message
    path = _write(tmp_path, f"method: dino\nrecipes:\n  x:\n    values: {values}\n")
    with pytest.raises(BenchError, match=message):
        _cfg(recipe=path)


def test_unreadable_recipe_files(tmp_path):
    with pytest.raises(BenchError, match="file not found"):
        _cfg(recipe=str(tmp_path / "none.yaml"))
    with pytest.raises(BenchError, match="not valid YAML"):
        _cfg(recipe=_write(tmp_path, "method: dino\nrecipes: {x: [\n"))
    with pytest.raises(BenchError, match="holds several recipes"):
        _cfg(recipe=_write(tmp_path, "method: dino\nrecipes: {a: {}, b: {}}\n"))


def test_builtin_values_need_a_source(tmp_path, monkeypatch):
    folder = tmp_path / "methods" / "recipes"
    folder.mkdir(parents=True)
    (folder / "dino.yaml").write_text("method: dino\nrecipes: {paper: {values: {pretrain.epochs: 3}}}\n")
    monkeypatch.setattr(recipes, "recipe_dir", lambda: str(folder))
    with pytest.raises(BenchError, match="pretrain.epochs: every built-in value needs its source"):
        recipes.builtin("dino")


# ------------------------------------------------------------------------------ the paper comparison

def test_record_warning_and_tags_count_the_values_that_differ_from_paper():
    paper = _cfg(data="voc12")
    assert recipe_tools.differences(paper, "dino") == [] and recipe_tools.warning_line(paper) == ""
    changed = _cfg(data="voc12", sets=["methods.dino.n_local=2"])
    assert recipe_tools.differences(changed, "dino") == [{"key": "methods.dino.n_local", "value": 2, "paper": 8}]
    cpu = _cfg(data="voc12", recipe="cpu")
    n = len(recipe_tools.differences(cpu, "dino"))
    assert n == 21  # the 21 lines of `bench recipe diff dino paper cpu` (20 + blur_ref_size 0 → 224)
    line = recipe_tools.warning_line(cpu)
    assert line.startswith("warning: real data") and "dino (cpu) 21" in line and "\n" not in line
    assert recipe_tools.warning_line(_cfg(recipe="cpu")) == ""  # synthetic: no published configuration applies
    tags = recipe_tools.tags(cpu, "dino")
    assert tags == {"recipe": "cpu", "recipe_hash": recipes.builtin("dino")["cpu"].hash(), "recipe_changes": "21"}
    assert recipe_tools.tags(cpu)["recipe"] == "cpu"  # the parent run


def test_machine_settings_are_not_differences():
    c = _cfg(data="voc12", sets=["pretrain.workers=4", "pretrain.log_every=1"])
    assert recipe_tools.differences(c, "dino") == []


def test_recipe_hash_changes_with_a_value():
    rec = recipes.builtin("dino")["paper"]
    other = recipes.Recipe(rec.method, rec.name, {**rec.values, "pretrain.epochs": 299}, version=rec.version)
    assert rec.hash() != other.hash() and len(rec.hash()) == 12


def test_paper_run_needs_init_where_the_paper_starts_from_weights(tmp_path):
    c = _cfg(["leopart"], data="voc12")
    with pytest.raises(BenchError, match="starts from DINO ViT-S/16 .*dl.fbaipublicfiles.com.*pass --init FILE"):
        recipe_tools.require_init(c)
    recipe_tools.require_init(_cfg(["leopart"], data="voc12", recipe="cpu"))
    recipe_tools.require_init(_cfg(["leopart"], data="voc12", sets=[f"backbone.init={tmp_path}/w.pt"]))


def test_cli_warns_on_real_data_then_fails_on_the_missing_dataset(capsys):
    assert main(["run", "--methods", "dino", "--data", "voc12", "--recipe", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("warning: real data (voc12 → voc12)") and "dino (cpu) 21" in err[0]
    assert err[-1].startswith("error: data.voc12.root: not set")


# ------------------------------------------------------------------------------ estimate of a paper run

def test_paper_runs_on_small_machines_get_an_estimate_unless_off():
    c = _cfg(data="voc12")
    assert recipe_tools.needs_estimate(c, "dino")  # CPU only
    assert not recipe_tools.needs_estimate(_cfg(data="voc12", estimate=False), "dino")
    assert not recipe_tools.needs_estimate(_cfg(data="voc12", recipe="cpu"), "dino")
    assert recipe_tools.needs_estimate(_cfg(data="voc12", sets=["pretrain.gpu=true", "pretrain.workers=2"]), "dino")
    assert not recipe_tools.needs_estimate(_cfg(data="voc12", sets=["pretrain.gpu=true", "pretrain.workers=16"]),
                                           "dino")


def test_estimate_times_real_steps_and_extrapolates():
    c = _cfg(sets=["data.synthetic.num_train=8", "pretrain.batch_size=4", "pretrain.epochs=2"])
    est = recipe_tools.estimate_seconds(c, "dino", steps=1, images=2)
    assert est["seconds_per_image"] > 0 and est["total_images"] == 2 * (8 // 4) * 4
    assert est["seconds"] == pytest.approx(est["seconds_per_image"] * est["total_images"])


# --------------------------------------------------------------------------------------- seeing it

def test_print_config_is_yaml_keyed_like_set_paths_and_reads_back(tmp_path, capsys):
    import ray

    assert main(["run", "--methods", "dino", "--recipe", "paper", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert not ray.is_initialized()
    flat = yaml.safe_load(text)
    assert flat["run.recipe"] == "paper" and flat["methods.dino.n_local"] == 8
    assert flat["pretrain.lr"] == pytest.approx(0.002) and flat["backbone.name"] == "vit_small_p16"
    assert "# dino: recipe paper (version 2, hash" in text
    assert all(k.split(".")[0] in ("run", "tracking", "tasks", "data", "methods", "pretrain", "backbone")
               for k in flat)
    back = tmp_path / "resolved.yaml"
    back.write_text(text)
    again = load_config(str(back), [], None)
    assert recipe_tools.effective_values(again, "dino", machine=True) == {
        k: v for k, v in flat.items() if k.split(".")[0] in ("methods", "pretrain", "backbone")}


def test_print_config_several_methods_one_document_each(capsys):
    assert main(["run", "--methods", "dino,clove", "--print-config"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert len(docs) == 3 and "methods.dino.n_local" in docs[1] and "methods.clove.n_local" in docs[2]


def test_recipe_commands(capsys, tmp_path):
    assert main(["recipe", "diff", "dino", "paper", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dino: 21 of 37 values differ between paper and cpu")
    assert "methods.dino.blur_ref_size: 0 → 224" in out and "pretrain.warmup_start_factor" not in out  # both 0
    assert "methods.dino.n_local: 8 → 2" in out and "main_dino.py --local_crops_number 8" in out
    assert "pretrain.lr: 0.002 → 0.001" in out and "0.0005 per 256 images × batch 1024" in out
    assert main(["recipe", "show", "leopart"]) == 0
    out = capsys.readouterr().out
    assert "dino_deitsmall16_pretrain.pth" in out and "methods.leopart.blur_ref_size = 0    [" in out
    path = _write(tmp_path, """
        method: leopart
        recipes:
          mine:
            values: {pretrain.epochs: 3}
            pending:
              - {key: methods.leopart.x, value: 1, source: my notes, why: no such field yet}
        """)
    assert main(["recipe", "show", "leopart", "--recipe", path]) == 0
    assert "  pending methods.leopart.x = 1    [my notes; no such field yet]" in capsys.readouterr().out
    assert main(["recipe", "list"]) == 0
    out = capsys.readouterr().out
    assert all(f"{m:8s} paper" in out and f"{m:8s} cpu" in out for m in ("dino", "clove", "croc", "leopart", "vice"))
    assert main(["recipe", "show", "dino", "--recipe", "nope"]) == 2


# ------------------------------------------------------------------------------ tasks follow the dataset

def test_tasks_take_the_datasets_published_protocol():
    assert _cfg(tasks=["linseg"]).tasks["linseg"].preset == "synthetic"
    for ds in ("voc12", "coco_things", "coco_stuff15"):
        assert _cfg(tasks=["linseg"], data=ds).tasks["linseg"].preset == "leopart"
    assert _cfg(tasks=["linseg"], data="voc12", sets=["tasks.linseg.preset=synthetic"]).tasks["linseg"].preset \
        == "synthetic"
    for ds in ("coco_stuff27", "cityscapes27"):
        cl = _cfg(tasks=["cluster"], data=ds).tasks["cluster"]
        assert (cl.k, cl.match, cl.seeds) == (27, "hungarian", 5)
    assert _cfg(tasks=["cluster"]).tasks["cluster"].k == 0


# ------------------------------------------------------------------------------------------- ranges

@pytest.mark.parametrize("item, message", [
    ("pretrain.batch_size=0", "pretrain.batch_size = 0: expected >= 1"),
    ("pretrain.epochs=0", "pretrain.epochs = 0: expected >= 1"),
    ("pretrain.lr=0", "pretrain.lr = 0.0: expected > 0"),
    ("pretrain.momentum=1", r"pretrain.momentum = 1.0: expected in \[0, 1\)"),
    ("pretrain.workers=0", "pretrain.workers = 0: expected >= 1"),
    ("methods.dino.teacher_temp=0", "methods.dino.teacher_temp = 0.0: expected > 0"),
    ("methods.dino.momentum_teacher=1.5", r"methods.dino.momentum_teacher = 1.5: expected in \[0, 1\)"),
    ("methods.dino.out_dim=1", "methods.dino.out_dim = 1: expected >= 2"),
    ("methods.dino.local_scale=[0.0,0.4]", r"methods.dino.local_scale = \(0.0, 0.4\): expected in \(0, 1\]"),
    ("methods.leopart.epsilon=-0.1", "methods.leopart.epsilon = -0.1: expected > 0"),
    ("methods.vice.flip_p=2", r"methods.vice.flip_p = 2.0: expected in \[0, 1\]"),
    ("methods.croc.n_tokens=1", "methods.croc.n_tokens = 1: expected >= 2"),
    ("methods.dino.local_size=4", "methods.dino.local_size = 4: expected >= 8, the patch size"),
    ("tasks.linseg.lr=-1", r"tasks.linseg.lr = -1.0: expected > 0"),
    ("backbone.drop_path=1", r"backbone.drop_path = 1.0: expected in \[0, 1\)"),
])
def test_out_of_range_values_are_one_line_at_resolution(item, message, capsys):
    methods = item.split(".")[1] if item.startswith("methods.") else "dino"
    tasks = "linseg"
    assert main(["run", "--methods", methods, "--tasks", tasks, "--set", item, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re

    assert re.search(message, err), err


def test_range_helper_describes_every_bound():
    from bench.config import Range, check_range, PretrainConfig

    assert Range(ge=0, lt=1).describe() == "in [0, 1)" and Range(gt=0).describe() == "> 0"
    assert Range(le=3).describe() == "<= 3" and Range(gt=0, le=1).describe() == "in (0, 1]"
    check_range(PretrainConfig, "lr", 1e-3, "pretrain.lr")
    with pytest.raises(BenchError, match="pretrain.lr = nan: expected > 0"):
        check_range(PretrainConfig, "lr", float("nan"), "pretrain.lr")


def test_resolve_rejects_a_section_that_is_not_a_mapping():
    with pytest.raises(BenchError, match="pretrain: expected a mapping, got int"):
        resolve({"pretrain": 3})


@pytest.mark.parametrize("item, message", [
    ("dino.teacher_temp=uniform(-0.1,0.07)", r"dino.teacher_temp = -0.1: expected > 0"),
    ("dino.momentum_teacher=uniform(0.99,1.0)", r"dino.momentum_teacher = 1.0: expected in \[0, 1\)"),
    ("pretrain.clip_grad=choice(-1,3)", "pretrain.clip_grad = -1: expected >= 0"),
    ("pretrain.lr=0", "pretrain.lr = 0: expected > 0"),
    ("dino.n_local=randint(-1,4)", "dino.n_local = -1: expected >= 0"),
])
def test_tune_space_bounds_are_range_checked(item, message):
    from bench.search_space import build_space

    assert message
    with pytest.raises(BenchError, match=message):
        build_space("dino", [item])
    build_space("dino", ["dino.teacher_temp=uniform(0.02,0.07)", "dino.n_local=randint(0,4)"])
