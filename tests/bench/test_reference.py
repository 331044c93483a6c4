"""results/reference.yaml and bench.reference: the published numbers, matching, leaderboard rendering, CLI."""

import math

import pytest
import yaml

from bench import reference
from bench.errors import BenchError
from bench.leaderboard import Row, render, to_frame, to_markdown
from bench.registry import DATASETS, TASKS

# datasets and protocol keys the file may name although bench has no such dataset or preset (kept as
# documentation; they never match a measured row)
NOT_IN_BENCH_DATASETS = {"coco_instances", "cityscapes_instances", "lvis_instances"}
NOT_IN_BENCH_PROTOCOLS = {"linseg[vice_mmseg]", "cluster[vice_highres]", "det[lvis_1x]"}


@pytest.fixture(scope="module")
def refs():
    return reference.load()


def _find(refs, label, dataset, task=None):
    hits = [r for r in refs if r.label == label and r.dataset == dataset and (task is None or r.task == task)]
    assert len(hits) == 1, (label, dataset, hits)
    return hits[0]


def test_shipped_file_names_real_tasks_metrics_datasets_and_protocols(refs):
    import importlib

    assert len(refs) >= 40
    metric_names = {"linseg": {"miou", "pixel_acc"},
                    "cluster": {"miou", "pixel_acc"} | {f"miou_k{k}" for k in (100, 300, 500)},
                    "hbird": {"miou", "miou_std", "pixel_acc"},
                    "vos": {"jf", "j_mean", "f_mean", "j_recall", "f_recall"},
                    "det": {f"{kind}_{s}" for kind in ("bbox", "segm") for s in importlib.import_module("tasks.det").STAT_NAMES}}
    for r in refs:
        assert r.task in TASKS.names(), r
        assert set(r.metrics) <= metric_names[r.task], r
        assert r.dataset in DATASETS.names() or r.dataset in NOT_IN_BENCH_DATASETS, r
        assert r.source and r.backbone and r.evidence, r
        for key in r.protocols:
            if key in NOT_IN_BENCH_PROTOCOLS:
                continue
            task, _, preset = key.partition("[")
            assert task == r.task, r
            if preset:  # "linseg[leopart]": the preset must exist in that task
                assert preset.rstrip("]") in importlib.import_module(f"tasks.{task}").PRESETS, key


def test_numbers_agree_with_the_specs_and_posters(refs):
    # typed by hand from protocols.md §1.7 / §2.7 / §3.6 and methods.md §1.8 / §2.7
    assert _find(refs, "CrOC (README, COCO)", "voc12").metrics == {"miou": 54.9}
    assert _find(refs, "CrOC (README, COCO+)", "coco_things").metrics == {"miou": 64.4}
    assert _find(refs, "Leopart (README)", "voc12").metrics == {"miou": 69.3}
    assert _find(refs, "ViCE (paper, low-res, K=256)", "coco_stuff27").metrics == {"miou": 17.98, "pixel_acc": 54.92}
    assert _find(refs, "ViCE (paper, high-res, K=256)", "coco_stuff27").metrics == {"miou": 21.77, "pixel_acc": 64.75}
    assert _find(refs, "PiCIE (paper, K=27)", "coco_stuff27").metrics == {"miou": 13.84, "pixel_acc": 48.09}
    c4 = _find(refs, "CLoVE 400ep (README, C4)", "coco_instances")
    assert [c4.metrics[k] for k in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75")] == [
        41.0, 60.3, 44.2, 35.5, 57.2, 38.1]
    assert _find(refs, "CLoVE 400ep (paper)", "cityscapes_instances").metrics == {"segm_AP": 37.2, "segm_AP50": 65.3}


def test_croc_paper_rows_reproduce_the_slides_average_column(refs):
    # the CrOC slides print Avg = mean over PVOC12 / COCO-Things / COCO-Stuff: a typo in any cell breaks it
    for label, avg in (("CrOC (paper, COCO)", 53.3), ("CrOC (paper, COCO+)", 58.3), ("CrOC (paper, ImageNet)", 63.1)):
        cells = [_find(refs, label, d).metrics["miou"] for d in ("voc12", "coco_things", "coco_stuff15")]
        assert round(sum(cells) / 3, 1) == avg, (label, cells)


def _row(task, dataset, protocol, method="croc", recipe="paper", **metrics):
    return Row(method=method, task=task, metrics=metrics, primary="miou" if task != "det" else "bbox_AP",
               dataset=dataset, backbone="vit_small_p16", protocol=protocol, recipe=recipe)


def test_matching_needs_same_dataset_and_protocol(refs):
    lin = "linseg[leopart]: frozen features, 1x1 conv ..."
    got = {r.method for r in reference.matching_rows([_row("linseg", "voc12", lin, miou=40.0, pixel_acc=80.0)], refs)}
    assert "ref: CrOC (README, COCO)" in got and "ref: Leopart (README)" in got and "ref: DINO (CrOC table, COCO)" in got
    assert all(m.startswith("ref: ") for m in got)
    # the R50 learning-rate preset is the same protocol
    r50 = reference.matching_rows([_row("linseg", "voc12", "linseg[leopart_r50]: ...", miou=1.0)], refs)
    assert {r.method for r in r50} == got
    # same dataset, other protocol; same protocol, other dataset: nothing
    assert reference.matching_rows([_row("linseg", "voc12", "linseg[synthetic]: ...", miou=1.0)], refs) == []
    assert reference.matching_rows([_row("linseg", "synthetic", lin, miou=1.0)], refs) == []
    assert reference.matching_rows([_row("linseg", "coco_stuff27", lin, miou=1.0)], refs) == []  # ViCE linear: mmseg


def test_cluster_matching_uses_k_and_matching_rule(refs):
    k27 = "cluster: frozen features, torch k-means K=27 (k-means++), ..., hungarian matching on the dataset ..."
    k256 = "cluster: frozen features, torch k-means K=256 (k-means++), ..., majority matching on the dataset ..."
    got27 = reference.matching_rows([_row("cluster", "coco_stuff27", k27, miou=5.0, pixel_acc=30.0)], refs)
    got256 = reference.matching_rows([_row("cluster", "coco_stuff27", k256, miou=5.0, pixel_acc=30.0)], refs)
    assert {r.method for r in got27} == {"ref: ViCE (paper, low-res, K=27)", "ref: PiCIE (paper, K=27)",
                                         "ref: DINO (ViCE table, K=27)"}
    assert {r.method for r in got256} == {"ref: ViCE (paper, low-res, K=256)"}  # high-res: another protocol
    city = reference.matching_rows([_row("cluster", "cityscapes27", k27, miou=5.0, pixel_acc=30.0)], refs)
    vice = [r for r in city if r.method == "ref: ViCE (paper, low-res, K=27)"][0]
    assert vice.metrics == {"miou": 12.81, "pixel_acc": 31.87} and vice.dataset == "cityscapes27"


def test_reference_metrics_are_cut_to_the_measured_columns(refs):
    k27 = "cluster: ... K=27 ... hungarian matching"
    got = reference.matching_rows([_row("cluster", "coco_stuff27", k27, miou=5.0)], refs)  # no pixel_acc measured
    assert got and all(set(r.metrics) == {"miou"} for r in got)
    assert all(r.extra["reference"] and r.primary == "miou" for r in got)


def _mini(**rows):
    base = {"label": "X", "method": "x", "task": "linseg", "protocol": "linseg[leopart]", "dataset": "voc12",
            "backbone": "vit_small_p16", "metrics": {"miou": 50.0}, "source": "somewhere", "evidence": "R"}
    base.update(rows)
    return {"rows": [base]}


@pytest.mark.parametrize("change, message", [
    ({"metrics": {"miou": 150.0}}, "rows[0].metrics.miou: expected a number in percent"),
    ({"metrics": {"miou": "high"}}, "rows[0].metrics.miou"),
    ({"metrics": {}}, "rows[0].metrics: expected a non-empty mapping"),
    ({"colour": "red"}, "rows[0]: unknown key(s) colour"),
    ({"protocol": []}, "rows[0].protocol: expected a non-empty string or list"),
    ({"evidence": "rumour"}, "rows[0].evidence: 'rumour' is not one of"),
    ({"label": ""}, "rows[0].label: expected a non-empty string"),
])
def test_bad_rows_are_one_clear_line(change, message):
    with pytest.raises(BenchError) as exc:
        reference.parse(_mini(**change), "ref.yaml")
    assert message in str(exc.value) and "ref.yaml" in str(exc.value) and "\n" not in str(exc.value)


def test_bad_files(tmp_path):
    missing = {k: v for k, v in _mini()["rows"][0].items() if k != "source"}
    with pytest.raises(BenchError, match=r"rows\[0\]: missing source"):
        reference.parse({"rows": [missing]}, "f")
    with pytest.raises(BenchError, match="duplicate"):
        reference.parse({"rows": _mini()["rows"] * 2}, "f")
    with pytest.raises(BenchError, match="expected a mapping with a 'rows' list"):
        reference.parse([1, 2], "f")
    with pytest.raises(BenchError, match="file not found"):
        reference.load(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows: [\n  {label: x,\n")
    with pytest.raises(BenchError, match="not valid YAML at line"):
        reference.load(str(bad))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_mini()))
    assert reference.load(str(good))[0].metrics == {"miou": 50.0}


def _board(refs):
    lin = "linseg[leopart]: frozen features ..."
    measured = [_row("linseg", "voc12", lin, method="croc", miou=40.0, pixel_acc=80.0),
                _row("linseg", "voc12", lin, method="random-init", miou=10.0, pixel_acc=50.0)]
    return measured + reference.matching_rows(measured, refs)


def test_leaderboard_puts_references_last_marked_with_their_source(refs):
    rows = _board(refs)
    df = to_frame(rows)
    assert list(df["method"][:2]) == ["croc", "random-init"]
    assert all(m.startswith("ref: ") for m in df["method"][2:])
    assert list(df.columns)[-1] == "source" and df["source"][0] == "measured"
    assert "stegmuel/CrOC README" in df.loc[df["method"] == "ref: CrOC (README, COCO)", "source"].item()
    assert math.isnan(df.loc[df["method"] == "ref: CrOC (README, COCO)", "linseg/pixel_acc"].item())
    md = to_markdown(rows)
    assert "| *ref: CrOC (README, COCO)* | – | *54.90* | – |" in md  # recipe "–": published, not run here
    assert "| croc | paper | 40.00 | 80.00 |" in md
    assert "not measured here" in md
    plain = to_frame(rows[:2])
    assert "source" not in plain.columns  # without references the table is unchanged


def test_render_never_highlights_a_reference_as_best(refs):
    from rich.console import Console

    console = Console(record=True, width=260, force_terminal=True, color_system="standard")
    render(_board(refs), console=console)
    text = console.export_text(styles=True, clear=False)
    green = "\x1b[32m"
    assert f"{green}40.00" in text  # the best measured row is highlighted
    assert f"{green}69.30" not in text and "69.30" in text  # Leopart's published 69.3 is higher but not measured
    plain = console.export_text(clear=False)
    assert "ref: rows are published numbers" in plain
    assert "[1] CrOC CVPR 2023 slides" in plain  # sources as numbered notes under the table


def _store(tmp_path, dataset="voc12", protocol="linseg[leopart]: frozen features ...", recipe="paper"):
    from bench.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlruns.db'}", "bench")
    for method, miou in (("croc", 40.0), ("random-init", 10.0)):
        rid = tracker.start_run(f"eval-{method}-linseg", {
            "bench.kind": "eval", "bench.run_id": "r1", "method": method, "task": "linseg", "dataset": dataset,
            "backbone": "vit_small_p16", "bench.primary": "miou", "bench.protocol": protocol, "recipe": recipe,
            "recipe_changes": "0"})
        tracker.log_metrics(rid, {"linseg/miou": miou, "linseg/pixel_acc": 70.0})
        tracker.finish(rid)
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


def test_cli_leaderboard_with_reference_and_export(tmp_path, capsys, monkeypatch):
    from bench.cli import main

    monkeypatch.setenv("COLUMNS", "200")  # rich wraps long labels at the captured terminal's 80 columns
    uri = _store(tmp_path)
    out_dir = tmp_path / "results"
    assert main(["leaderboard", "--tracking-uri", uri, "--with-reference", "--export", "--results-dir",
                 str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "ref: CrOC (README, COCO)" in out and "ref: Leopart (README)" in out and "croc" in out
    assert "ref: ViCE" not in out  # other dataset / protocol
    md = (out_dir / "leaderboard-bench.md").read_text()
    assert "*ref: Leopart (README)*" in md and "| croc |" in md
    csv = (out_dir / "leaderboard-bench.csv").read_text()
    assert "MkuuWaUjinga/leopart README" in csv

    assert main(["leaderboard", "--tracking-uri", uri]) == 0
    assert "ref:" not in capsys.readouterr().out  # only on request


def test_cli_leaderboard_with_reference_when_nothing_matches(tmp_path, capsys):
    from bench.cli import main

    uri = _store(tmp_path, dataset="synthetic", protocol="linseg[synthetic]: frozen features ...")
    assert main(["leaderboard", "--tracking-uri", uri, "--with-reference"]) == 0
    out = capsys.readouterr().out
    assert "no reference row matches" in out and "voc12/linseg[leopart]" in out and "ref: " not in out.split(
        "no reference row matches")[1]
    assert main(["leaderboard", "--tracking-uri", uri, "--reference", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --reference") and "file not found" in err and "\n" not in err


def test_cli_with_reference_only_beside_paper_rows(tmp_path, capsys, monkeypatch):
    """Rows of another recipe get no published neighbours and are marked not comparable (issue 17)."""
    from bench.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    uri = _store(tmp_path, recipe="cpu")
    assert main(["leaderboard", "--tracking-uri", uri, "--with-reference", "--export", "--results-dir",
                 str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "ref: CrOC" not in out and "not comparable (recipe cpu)" in out and "no row ran a `paper` recipe" in out
    csv = (tmp_path / "out" / "leaderboard-bench.csv").read_text()
    assert "recipe" in csv.splitlines()[0] and ",cpu," in csv


def test_paper_row_with_changed_values_is_not_comparable(refs):
    lin = "linseg[leopart]: frozen features ..."
    changed = _row("linseg", "voc12", lin, recipe="paper (2 changed)", miou=40.0)
    assert reference.matching_rows([changed], refs) == []
    assert reference.matching_rows([_row("linseg", "voc12", lin, miou=40.0)], refs)
    assert reference.mark_comparability([changed])[0].extra["comparable"].startswith("not comparable")
