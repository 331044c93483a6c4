"""The published rows of the new protocols (hbird, overclustering, vos) match exactly the measured rows whose
protocol line the tasks write for the same settings, and no others."""

from __future__ import annotations

from bench import reference
from bench.config import build
from bench.leaderboard import Row
from tasks import hbird, overcluster, vos
from tasks.cluster import ClusterConfig


def _row(task, dataset, protocol, metrics):
    return Row(method="x", task=task, metrics=metrics, primary=next(iter(metrics)), dataset=dataset,
               backbone="vit_small_p16", protocol=protocol, recipe="paper")


def _labels(rows, refs):
    return sorted(r.method for r in reference.matching_rows(rows, refs))


def test_new_protocol_rows_match_their_settings_only():
    refs = reference.load()
    h = lambda preset, **kw: hbird.protocol_line(build(hbird.HbirdConfig, {"preset": preset, **kw}, "tasks.hbird"),
                                                 10582, 1, 21, 1449, 10_240_000)
    m4 = _labels([_row("hbird", "voc12", h("m1e4"), {"miou": 1.0})], refs)
    assert "ref: NeCo from DINO (README)" in m4 and "ref: DINO (open-hummingbird-eval)" in m4
    assert "ref: CrIBo (README, ImageNet)" in m4 and len(m4) == 7  # NeCo ×3, DINO, CrIBo ×3
    assert _labels([_row("hbird", "voc12", h("m1e2"), {"miou": 1.0})], refs) == ["ref: DINO (open-hummingbird-eval)"]
    assert _labels([_row("hbird", "voc12", h("synthetic"), {"miou": 1.0})], refs) == []
    assert _labels([_row("hbird", "voc12", h("m1e4", train_fraction=0.125), {"miou": 1.0})], refs) == []
    assert _labels([_row("hbird", "voc12", h("m1e4", memory_size=1024000), {"miou": 1.0})], refs) == []
    assert len(_labels([_row("hbird", "ade20k", h("m1e4"), {"miou": 1.0})], refs)) == 3

    ocfg = build(ClusterConfig, {"preset": "overcluster"}, "tasks.cluster")
    line = overcluster.protocol_line(ocfg, 50, False, 1449, 5, 21, 500)
    oc = reference.matching_rows([_row("cluster", "voc12", line, {"miou": 1.0, "miou_k500": 1.0})], refs)
    assert sorted(r.metrics["miou_k500"] for r in oc) == [47.9, 53.1, 55.3]
    small = build(ClusterConfig, {"preset": "overcluster", "mask_size": 0, "input_size": 0}, "tasks.cluster")
    assert reference.matching_rows([_row("cluster", "voc12", overcluster.protocol_line(small, 50, False, 1, 5, 21, 500),
                                         {"miou_k500": 1.0})], refs) == []

    vline = vos.protocol_line(build(vos.VosConfig, {"preset": "davis"}, "tasks.vos"), 59, 30, "davis17")
    v = reference.matching_rows([_row("vos", "davis17", vline, {"jf": 1.0, "j_mean": 1.0, "f_mean": 1.0})], refs)
    assert {r.metrics["jf"] for r in v} == {61.8, 62.3, 69.9, 66.0}
    syn = vos.protocol_line(build(vos.VosConfig, {}, "tasks.vos"), 30, 16, "synthetic_video")
    assert reference.matching_rows([_row("vos", "davis17", syn, {"jf": 1.0})], refs) == []
