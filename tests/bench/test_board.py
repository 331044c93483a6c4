"""Leaderboard aggregation and keys, on hand-made MLflow stores: two evaluation datasets, two linseg protocols,
three seeds. The expected tables, mean, std and n, and the never-mixed rule."""

import math
import os

import numpy as np
import pytest

from bench.board import Row, aggregate, baseline_label, row_key, tables
from bench.leaderboard import build, render, rows_from_mlflow, to_frame, to_markdown
from bench.tracking import Tracker, run_tags

# (dataset, protocol hash) -> method -> three seeds' mIoU
CELLS = {
    ("synthetic", "p1"): {"dino": [50.0, 52.0, 54.0], "vice": [60.0, 61.0, 62.0], "random-init": [40.0, 40.5, 41.0]},
    ("synthetic", "p2"): {"dino": [30.0, 33.0, 36.0]},
    ("voc12", "p1"): {"dino": [20.0, 21.0, 22.0], "vice": [25.0, 27.0, 29.0]},
}


def _log(tracker, run_id, dataset, phash, method, seed, miou, per_image=None, tmp=None):
    tags = run_tags("eval", run_id, method=method, task="linseg", dataset=dataset, backbone="vit_tiny_d4_p8",
                    pretrain_dataset="" if method == "random-init" else "synthetic", primary="miou",
                    protocol=f"linseg[{phash}]", protocol_name="linseg", protocol_version=1, protocol_hash=phash,
                    data_hash=f"h-{dataset}", seed=seed, git_commit="abc")
    tags["bench.display"] = "miou"
    rid = tracker.start_run(f"eval-{method}", tags)
    tracker.log_metrics(rid, {"linseg/miou": miou, "linseg/pixel_acc": miou + 20.0,
                              "compute/images_seen": 96.0, "compute/params": 1.8e6})
    if per_image is not None:
        path = os.path.join(tmp, f"{rid}.npz")
        np.savez_compressed(path, confusion=per_image)
        tracker.log_artifact(rid, path, "per_image")
        tracker.set_tags(rid, {"bench.per_image": f"per_image/{os.path.basename(path)}"})
    tracker.finish(rid)
    return rid


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = Tracker(uri, "bench")
    for (dataset, phash), methods in CELLS.items():
        for method, values in methods.items():
            for seed, v in enumerate(values):
                _log(tracker, f"run-{dataset}-{phash}", dataset, phash, method, seed, v)
    return tracker


def test_experiment_board_one_table_per_dataset_and_protocol_with_mean_std_n(store):
    rows = rows_from_mlflow(store)
    assert len(rows) == sum(len(v) for m in CELLS.values() for v in m.values())  # 24 seed rows
    board = build(rows, per_protocol=True)
    got = {}
    for table in board.tables:
        keys = {(r.dataset, r.protocol_hash) for r in table}
        assert len(keys) == 1, "a table mixes datasets or protocols"
        got[keys.pop()] = {r.method: r for r in table}
    assert set(got) == set(CELLS)
    for key, methods in CELLS.items():
        assert set(got[key]) == set(methods)
        for method, values in methods.items():
            r = got[key][method]
            assert r.n == 3 and sorted(r.seeds) == [0, 1, 2]
            assert r.metrics["miou"] == pytest.approx(np.mean(values))
            assert r.std["miou"] == pytest.approx(np.std(values, ddof=1))
    # the synthetic p2 dino (33) is never averaged with p1's (52), nor voc12's with synthetic's
    assert got[("synthetic", "p1")]["dino"].metrics["miou"] == pytest.approx(52.0)
    assert got[("voc12", "p1")]["dino"].metrics["miou"] == pytest.approx(21.0)
    assert got[("synthetic", "p1")]["vice"].mark["miou"] == "best"


def test_cli_experiment_leaderboard_prints_three_tables_and_run_id_one(store, capsys, monkeypatch):
    from bench.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["leaderboard", "--tracking-uri", store.uri]) == 0
    out = capsys.readouterr().out  # not a terminal: markdown, one heading per table
    assert out.count("| method |") == 3
    assert "52.00 ± 2.00 (3)" in out and "33.00 ± 3.00 (3)" in out and "21.00 ± 1.00 (3)" in out
    assert main(["leaderboard", "--tracking-uri", store.uri, "--run-id", "run-voc12-p1"]) == 0
    out = capsys.readouterr().out
    assert out.count("| method |") == 1 and "27.00 ± 2.00 (3)" in out and "52.00" not in out


def test_newest_row_per_seed_wins_and_one_seed_is_a_plain_value():
    base = dict(task="linseg", primary="miou", dataset="d", protocol_hash="p")
    rows = [Row(method="dino", metrics={"miou": 10.0}, seed=0, **base),
            Row(method="dino", metrics={"miou": 12.0}, seed=0, **base),  # the same cell again, newer
            Row(method="dino", metrics={"miou": 14.0}, seed=1, **base),
            Row(method="clove", metrics={"miou": 9.0}, seed=0, **base)]
    agg = {r.method: r for r in aggregate(rows)}
    assert agg["dino"].n == 2 and agg["dino"].metrics["miou"] == pytest.approx(13.0)
    assert agg["dino"].std["miou"] == pytest.approx(math.sqrt(2.0))
    md = to_markdown(rows)
    assert "13.00 ± 1.41 (2)" in md and "| clove | 9.00 |" in md


def test_row_key_separates_every_component():
    base = Row(method="dino", task="linseg", metrics={"miou": 1.0}, primary="miou", dataset="d", backbone="b",
               recipe="r", init="", pretrain_dataset="p", data_hash="h", protocol_name="linseg",
               protocol_version=1, protocol_hash="x", seed=0)
    from dataclasses import replace

    variants = [replace(base, **{f: v}) for f, v in (("method", "vice"), ("recipe", "r2"), ("backbone", "b2"),
                                                    ("init", "i.pt"), ("pretrain_dataset", "p2"),
                                                    ("dataset", "d2"), ("data_hash", "h2"),
                                                    ("protocol_version", 2), ("protocol_hash", "y"))]
    assert len(variants) == 9
    keys = {row_key(r) for r in [base] + variants}
    assert len(keys) == 10
    assert len(aggregate([base] + variants)) == 10
    assert len(tables([base] + variants, per_protocol=True)) == 5  # dataset, data hash, version, protocol hash


def test_baseline_label_names_the_init_checkpoint():
    assert baseline_label("") == "random-init"
    assert baseline_label("/ckpts/dino_vits16.pth") == "init:dino_vits16.pth"


def _det_rows(seeds=3):
    rows = []
    for method, base in (("clove-with-a-long-name", 40.0), ("random-init", 10.0)):
        for s in range(seeds):
            m = {"bbox_AP": base + s, "bbox_AP50": base + 20 + s, "segm_AP": base - 2 + s}
            m.update({f"bbox_{k}": 1.0 + s for k in ("AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")})
            m.update({f"segm_{k}": 2.0 + s for k in ("AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10")})
            rows.append(Row(method=method, task="det", metrics=m, primary="bbox_AP", dataset="coco_things",
                            protocol_hash="d", seed=s, display=["bbox_AP", "bbox_AP50", "segm_AP"],
                            compute={"images_seen": 1.2e6, "pretrain_wall_s": 3600.0, "device_h": 8.0,
                                     "device": "GPU-h", "params": 21.7e6, "peak_mem_mb": 30000.0}))
    return rows


def test_terminal_table_keeps_every_value_at_80_columns():
    from rich.console import Console

    console = Console(record=True, width=80, force_terminal=True)
    render(_det_rows(), console=console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for value in ("41.00 ± 1.00 (3)", "61.00 ± 1.00 (3)", "39.00 ± 1.00 (3)", "11.00 ± 1.00 (3)"):
        assert value in text, value
    assert "bbox_AP75" not in text  # only the display metrics in the terminal ...
    assert "1.2M" in text and "8 GPU-h" in text and "21.7M" in text and "29.3 GiB" in text  # ... and compute
    md = to_markdown(_det_rows())
    assert "det/bbox_AP75" in md and "det/segm_AR10" in md  # the full set in markdown
    df = to_frame(_det_rows())
    assert {"det/bbox_AP", "det/bbox_AP_std", "det/bbox_AP_n", "images_seen", "device_h"} <= set(df.columns)
    assert df.loc[df["method"] == "random-init", "det/bbox_AP_n"].item() == 3
    assert df.loc[df["method"] == "random-init", "det/bbox_AP_cell"].item() == "11.00 ± 1.00 (3)"


def test_not_a_terminal_prints_markdown():
    import io

    from rich.console import Console

    buf = io.StringIO()
    render(_det_rows(), console=Console(file=buf, width=80))
    out = buf.getvalue()
    assert out.startswith("## Leaderboard") and "| method |" in out and "41.00 ± 1.00 (3)" in out
