"""The paired bootstrap (bench.significance) on cases whose answer is known, and its marks in the board."""

import numpy as np
import pytest

from bench.board import Row, mark_significance
from bench.significance import miou_batch, paired_bootstrap
from tasks.metrics import mean_iou


def _confusions(n_images, classes, accuracy, seed):
    """N×C×C per-image confusion counts of a classifier right with probability ``accuracy`` per pixel."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n_images, classes, classes), dtype=np.int64)
    for i in range(n_images):
        gt = rng.integers(0, classes, 400)
        pred = np.where(rng.random(400) < accuracy, gt, rng.integers(0, classes, 400))
        np.add.at(out[i], (gt, pred), 1)
    return out


def test_miou_batch_matches_the_task_metric_including_absent_classes_and_extra_columns():
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 30, (5, 7)).astype(float)
    conf[3] = 0
    conf[:, 3] = 0  # class 3 absent from GT and predictions: skipped (NaN)
    assert miou_batch(conf[None])[0] == pytest.approx(100 * mean_iou(conf))
    assert miou_batch(conf[:5, :5][None])[0] == pytest.approx(100 * mean_iou(conf[:5, :5]))


def test_identical_rows_are_indistinguishable():
    a = [{"confusion": _confusions(40, 4, 0.6, s)} for s in range(3)]
    # one seed: the same image resample for both rows, so every replicate's difference is exactly 0
    res = paired_bootstrap(a[:1], [dict(a[0])], replicates=300)
    assert res["diff"] == 0.0 and res["lo"] == 0.0 and res["hi"] == 0.0 and res["same"]
    # three seeds: each row's seeds are resampled on their own (seeds are not paired across methods)
    res = paired_bootstrap(a, [dict(x) for x in a], replicates=300)
    assert res["diff"] == 0.0 and res["lo"] < 0.0 < res["hi"] and res["same"]


def test_clearly_separated_rows_are_distinguished_and_close_ones_not():
    good = [{"confusion": _confusions(60, 4, 0.8, s)} for s in range(3)]
    bad = [{"confusion": _confusions(60, 4, 0.4, 10 + s)} for s in range(3)]
    res = paired_bootstrap(good, bad, replicates=500)
    assert res["diff"] > 20 and res["lo"] > 0 and not res["same"]
    # the same classifier on other noise: differences of the size of the noise are not significant
    twin = [{"confusion": _confusions(60, 4, 0.8, 20 + s)} for s in range(3)]
    assert paired_bootstrap(good, twin, replicates=500)["same"]


def test_score_statistics_and_lower_is_better():
    x = np.linspace(0, 1, 50)
    res = paired_bootstrap([{"score": x + 5}], [{"score": x}], replicates=200)
    assert res["diff"] == pytest.approx(5.0) and not res["same"]
    res = paired_bootstrap([{"score": x}], [{"score": x + 5}], replicates=200, higher_is_better=False)
    assert res["diff"] == pytest.approx(5.0) and not res["same"]
    with pytest.raises(ValueError):
        paired_bootstrap([{"score": x}], [{"score": x[:10]}])


def test_board_marks_best_and_ties_and_says_which_columns_were_not_tested():
    data = {"a": [{"confusion": _confusions(50, 3, 0.9, s)} for s in range(3)],
            "b": [{"confusion": _confusions(50, 3, 0.9, 5 + s)} for s in range(3)],
            "c": [{"confusion": _confusions(50, 3, 0.3, 9 + s)} for s in range(3)]}
    rows = []
    for name, seeds in data.items():
        m = float(np.mean([miou_batch(s["confusion"].sum(0)[None])[0] for s in seeds]))
        rows.append(Row(method=name, task="linseg", metrics={"miou": m}, primary="miou", n=3, per_image=list(seeds)))
    rows.append(Row(method="d", task="linseg", metrics={"miou": 1.0}, primary="miou"))  # no per-image file
    skipped = mark_significance(rows, load=lambda s: s, replicates=300)
    marks = {r.method: r.mark.get("miou") for r in rows}
    best = max(("a", "b"), key=lambda k: rows[[r.method for r in rows].index(k)].metrics["miou"])
    assert marks[best] == "best" and marks[{"a": "b", "b": "a"}[best]] == "≈" and marks["c"] == ""
    assert marks["d"] is None and skipped == {"linseg": "no per-image statistics"}
