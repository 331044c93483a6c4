"""CLoVE: positive-mask geometry, the margin-ranking loss by hand, hard negatives, the predictor, EMA,
data-parallel equivalence, and a short training run."""

import math
import os
import socket

import pytest
import torch
from torch.nn import functional as F

from bench.errors import BenchError
from methods.clove.loss import pixpro_positive_mask, relative_center_distance


def _one(*box):
    return torch.tensor([box], dtype=torch.float32)


NO = torch.tensor([False])
YES = torch.tensor([True])


# ----------------------------------------------------------------------------------- positive mask

def test_mask_identity_crop_is_the_identity():
    # same box, same 4×4 grid: neighbours are one cell apart = 1/√2 diagonal = 0.707 > T_pos 0.7
    b = _one(8, 16, 40, 48)
    m = pixpro_positive_mask(b, NO, (4, 4), b, NO, (4, 4), t_pos=0.7)
    assert m.shape == (1, 16, 16)
    assert torch.equal(m[0], torch.eye(16, dtype=torch.bool))
    # a threshold just above 1/√2 adds the 4-neighbourhood (and not the diagonals, at distance 1)
    m2 = pixpro_positive_mask(b, NO, (4, 4), b, NO, (4, 4), t_pos=0.75)[0]
    assert m2[5].nonzero().flatten().tolist() == [1, 4, 5, 6, 9]


def test_mask_shifted_crop_by_hand():
    # 1×4 strips of 8×8-px cells; the key crop is shifted right by half a cell (4 px).
    # query centres x = 4, 12, 20, 28; key centres x = 8, 16, 24, 32; diag = 8√2 = 11.31.
    # |dx| = 4 -> 0.354 < 0.7 (positive); |dx| = 12 -> 1.06 (negative).
    q, k = _one(0, 0, 32, 8), _one(4, 0, 36, 8)
    m = pixpro_positive_mask(q, NO, (1, 4), k, NO, (1, 4))[0].int()
    expected = [[1, 0, 0, 0],
                [1, 1, 0, 0],
                [0, 1, 1, 0],
                [0, 0, 1, 1]]
    assert m.tolist() == expected
    d = relative_center_distance(q, NO, (1, 4), k, NO, (1, 4))[0]
    assert abs(float(d[0, 0]) - 4 / (8 * math.sqrt(2))) < 1e-6
    # a shift of a whole cell (8 px): exact matches one cell over, the others are 1.41 diagonals away
    m1 = pixpro_positive_mask(q, NO, (1, 4), _one(8, 0, 40, 8), NO, (1, 4))[0].int()
    assert m1.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]


def test_mask_flipped_crop_mirrors_the_cells():
    # the key is the same box mirrored: key cell j shows source column 3 − j
    b = _one(0, 0, 32, 16)
    m = pixpro_positive_mask(b, NO, (2, 4), b, YES, (2, 4))[0].int()
    expected = torch.zeros(8, 8, dtype=torch.int32)
    for i in range(2):
        for j in range(4):
            expected[i * 4 + j, i * 4 + (3 - j)] = 1
    assert torch.equal(m, expected)
    # flipping both views is the identity again; the relation is symmetric (transpose when swapped)
    assert torch.equal(pixpro_positive_mask(b, YES, (2, 4), b, YES, (2, 4))[0], torch.eye(8, dtype=torch.bool))
    mq = pixpro_positive_mask(_one(3, 1, 40, 30), YES, (3, 3), _one(10, 5, 50, 45), NO, (4, 4))[0]
    mk = pixpro_positive_mask(_one(10, 5, 50, 45), NO, (4, 4), _one(3, 1, 40, 30), YES, (3, 3))[0]
    assert torch.equal(mq, mk.T) and mq.any()


def test_mask_no_overlap_is_empty():
    m = pixpro_positive_mask(_one(0, 0, 32, 32), NO, (4, 4), _one(48, 48, 96, 96), YES, (4, 4))
    assert not m.any()


def test_mask_uses_the_coarser_grid_and_agrees_with_the_reference_rule_on_random_boxes():
    # coarse key grid (2×2 cells of 16 px, centres 8, 24) vs fine query grid (4×4 cells of 8 px, centres
    # 4, 12, 20, 28) on the same box: the threshold is 0.7 · 16√2 = 15.84 px (the coarser diagonal), so
    # per-axis offsets (4, 4) = 5.7 and (4, 12) = 12.6 px are positives and (12, 12) = 17.0 px is not
    b = _one(0, 0, 32, 32)
    m = pixpro_positive_mask(b, NO, (4, 4), b, NO, (2, 2))[0]
    assert m.sum(0).tolist() == [8, 8, 8, 8]
    assert m.sum(1).view(4, 4).tolist() == [[1, 2, 2, 1], [2, 3, 3, 2], [2, 3, 3, 2], [1, 2, 2, 1]]
    assert not m[5, 3] and m[5, 0] and m[5, 1]  # query (12, 12): key (24, 24) is 17 px away
    # an independent rewrite of the rule in the reference's coordinates (boxes normalised per axis,
    # x0/x1 swapped for flips so the bin width is negative)
    g = torch.Generator().manual_seed(0)
    h_img, w_img = 60.0, 90.0
    for _ in range(20):
        boxes = []
        for _ in range(2):
            x0, y0 = float(torch.rand((), generator=g)) * 50, float(torch.rand((), generator=g)) * 30
            boxes.append([x0, y0, x0 + 10 + float(torch.rand((), generator=g)) * 40,
                          y0 + 10 + float(torch.rand((), generator=g)) * 30])
        fq, fk = bool(torch.rand((), generator=g) < 0.5), bool(torch.rand((), generator=g) < 0.5)
        (hq, wq), (hk, wk) = (3, 5), (4, 4)

        def centres(box, flip, h, w):
            x0, y0, x1, y1 = box[0] / w_img, box[1] / h_img, box[2] / w_img, box[3] / h_img
            if flip:
                x0, x1 = x1, x0
            bw, bh = (x1 - x0) / w, (y1 - y0) / h
            pts = [(x0 + (j + 0.5) * bw, y0 + (i + 0.5) * bh) for i in range(h) for j in range(w)]
            return pts, math.hypot(bw, bh)

        pq, dq = centres(boxes[0], fq, hq, wq)
        pk, dk = centres(boxes[1], fk, hk, wk)
        ref = torch.tensor([[math.dist(a, c) / max(dq, dk) < 0.7 for c in pk] for a in pq])
        got = pixpro_positive_mask(_one(*boxes[0]), torch.tensor([fq]), (hq, wq), _one(*boxes[1]),
                                   torch.tensor([fk]), (hk, wk), 0.7, torch.tensor([[60, 90]]))[0]
        assert torch.equal(got, ref)


# ----------------------------------------------------------------------------------- the loss

def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_pair_terms_and_margin_by_hand():
    from methods.clove import pair_terms

    s = math.sqrt(3) / 2
    q = _unit([1, 0], [0, 1])[None]  # 1×2×2
    k = _unit([1, 0], [0.5, s], [0, 1], [-1, 0])[None]  # 1×4×2
    pos = torch.tensor([[[True, False, False, False], [False, False, True, False]]])
    # a = q·k: q0 -> [1, .5, 0, -1], q1 -> [0, .866, 1, 0]; l = -2a
    # P = (-2 + -2) / (2 + 1e-6)
    # q0 non-positive l [-1, 0, 2]: top-3 smallest, drop the first -> mean(0, 2) = 1
    # q1 non-positive l [0, -1.732, 0] -> sorted [-1.732, 0, 0] -> mean(0, 0) = 0; Neg = 0.5
    p_term, n_term = pair_terms(q, k, pos, n_neg=3)
    assert abs(float(p_term) - (-4 / (2 + 1e-6))) < 1e-6
    assert abs(float(n_term) - 0.5) < 1e-6
    # keeping the hardest: q0 -> mean(-1, 0, 2) = 1/3, q1 -> mean(-1.732, 0, 0) = -0.577
    _, n_all = pair_terms(q, k, pos, n_neg=3, drop_hardest=False)
    assert abs(float(n_all) - (1 / 3 - 2 * s / 3) / 2) < 1e-6
    # margin ranking max(0, λP − Neg + μ): λ = 2 -> -4 - 0.5 + μ
    for mu, expected in [(100.0, 95.5), (5.0, 0.5), (3.0, 0.0)]:
        assert abs(float(F.relu(2 * p_term - n_term + mu)) - expected) < 1e-5


def test_clove_loss_two_global_views_by_hand():
    from methods.clove import clove_loss

    def cells(*angles):  # 1×2×1×3 map of unit vectors e(θ) = (cos θ, sin θ)
        return torch.tensor([[math.cos(t), math.sin(t)] for t in angles]).T.reshape(1, 2, 1, 3)

    # two global views with the same box and a 1×3 grid of 8-px cells: neighbours are 0.707 diagonals
    # apart, so the mask is the identity
    boxes = torch.tensor([[[0, 0, 24, 8], [0, 0, 24, 8]]], dtype=torch.float32)
    flips = torch.zeros(1, 2, dtype=torch.bool)
    pi = math.pi
    q0, q1 = cells(0, 0, 0), cells(0, pi / 2, pi)
    k0, k1 = cells(0, pi / 3, pi / 2), cells(pi / 2, pi, 0)
    # pair (query 1, key 0): a = [[1, .5, 0], [0, .866, 1], [-1, -.5, 0]], l = -2a
    #   P = (-2 - √3 + 0)/3; non-positive l per query, sorted, the first dropped (n_neg = 2):
    #   [-1, 0] -> 0, [-2, 0] -> 0, [1, 2] -> 2; Neg = 2/3
    # pair (query 0, key 1): a = [0, -1, 1] for every query; P = (0 + 2 - 2)/3 = 0
    #   [-2, 2] -> 2, [-2, 0] -> 0, [0, 2] -> 2; Neg = 4/3
    p_a, n_a, p_b, n_b = -(2 + math.sqrt(3)) / 3, 2 / 3, 0.0, 4 / 3
    for mu in (10.0, 2.0):
        expected = (max(0.0, 2 * p_a - n_a + mu) + max(0.0, 2 * p_b - n_b + mu)) / 2
        loss, logs = clove_loss([q0, q1], [k0, k1], boxes, flips, None, n_neg=2, margin=mu)
        assert logs["pairs"] == 2
        assert abs(float(loss) - expected) < 1e-5, (mu, float(loss), expected)
    # μ = 2 switches the first hinge off: (0 + 2/3) / 2
    assert abs(expected - 1 / 3) < 1e-9


def test_hardest_negative_is_excluded_and_only_top_k_count():
    from methods.clove import pair_terms

    torch.manual_seed(0)
    c = 16
    q = F.normalize(torch.randn(1, 1, c), dim=-1)
    # keys with prescribed similarities to the query: orthogonal complement mixing
    sims = torch.tensor([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.1, -0.2, -0.5])
    ortho = torch.randn(len(sims), c)
    ortho = ortho - (ortho @ q[0, 0])[:, None] * q[0, 0]
    ortho = F.normalize(ortho, dim=-1)
    k = (sims[:, None] * q[0, 0] + (1 - sims[:, None] ** 2).sqrt() * ortho)[None]
    pos = torch.zeros(1, 1, len(sims), dtype=torch.bool)
    pos[0, 0, 0] = True  # the most similar key is the positive: it must not count as a negative
    _, n_term = pair_terms(q, k, pos, n_neg=4)
    # non-positive similarities, hardest first: .9 (dropped), .8, .7, .6 -> l = -2 · mean
    assert abs(float(n_term) - (-2 * (0.8 + 0.7 + 0.6) / 3)) < 1e-5
    # the hardest negative's own value does not matter while it stays the hardest
    k2 = k.clone()
    k2[0, 1] = F.normalize(0.99 * q[0, 0] + 0.141 * ortho[1], dim=-1)
    assert abs(float(pair_terms(q, k2, pos, n_neg=4)[1]) - float(n_term)) < 1e-5
    # fewer keys than n_neg: clamped, and positives (+inf) never enter the mean
    _, n_small = pair_terms(q, k[:, :3], pos[:, :, :3], n_neg=10)
    assert abs(float(n_small) - (-2 * 0.8)) < 1e-5


def test_loss_magnitude_matches_the_reference_on_its_example_settings():
    # spec §2.4 / §2.6: B = 2, 256-d, 2 global 7×7 + 6 local 3×3 maps, random unit features, RRC boxes at
    # 224/96 scales: the reference logs 100.135 at step 0 and 100.14 on random tensors
    from bench.data.views import sample_box
    from methods.clove import clove_loss

    torch.manual_seed(0)

    def rrc(scale):
        t, l, h, w = sample_box(375, 500, scale, (3 / 4, 4 / 3))
        return [l, t, l + w, t + h]

    vals = []
    for _ in range(4):
        boxes = torch.tensor([[rrc((0.2, 1.0)), rrc((0.2, 1.0))] + [rrc((0.08, 0.3)) for _ in range(6)]
                              for _ in range(2)], dtype=torch.float32)
        flips = torch.rand(2, 8) < 0.5
        q = [F.normalize(torch.randn(2, 256, 7, 7), dim=1) for _ in range(2)]
        q += [F.normalize(torch.randn(2, 256, 3, 3), dim=1) for _ in range(6)]
        k = [F.normalize(torch.randn(2, 256, 7, 7), dim=1) for _ in range(2)]
        loss, logs = clove_loss(q, k, boxes, flips, torch.tensor([[375, 500]] * 2))
        assert logs["pairs"] == 14
        vals.append(float(loss))
    assert abs(sum(vals) / len(vals) - 100.14) < 0.03, vals


# ----------------------------------------------------------------------------------- model parts

def test_nmhsa_equals_torch_multihead_attention_then_l2_norm():
    from methods.clove.attention import NormalizedMHSA

    torch.manual_seed(0)
    blk = NormalizedMHSA(32, heads=8)
    ref = torch.nn.MultiheadAttention(32, 8, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(blk.in_proj.weight)
        ref.in_proj_bias.copy_(torch.randn(96) * 0.1)
        blk.in_proj.bias.copy_(ref.in_proj_bias)
        ref.out_proj.weight.copy_(blk.out_proj.weight)
        ref.out_proj.bias.copy_(torch.randn(32) * 0.1)
        blk.out_proj.bias.copy_(ref.out_proj.bias)
    x = torch.randn(3, 32, 4, 5)
    tokens = x.flatten(2).transpose(1, 2)
    expected = F.normalize(ref(tokens, tokens, tokens)[0].transpose(1, 2).reshape(3, 32, 4, 5), dim=1)
    out = blk(x)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(out.norm(dim=1), torch.ones(3, 4, 5), atol=1e-5)
    # cosine attention with a temperature is a different function of the same weights
    cos = NormalizedMHSA(32, heads=8, temperature=0.2)
    cos.load_state_dict(blk.state_dict())
    assert not torch.allclose(cos(x), out, atol=1e-3)


def test_global_bn_is_plain_bn_in_one_process():
    from methods.common.global_bn import GlobalBatchNorm2d, convert_global_bn

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    ref.load_state_dict(net.state_dict())
    convert_global_bn(net)
    assert isinstance(net[1], GlobalBatchNorm2d) and net.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(5, 3, 2, 2)
    assert torch.allclose(net(x), ref(x))
    assert torch.allclose(net[1].running_var, ref[1].running_var)


def _small_cfg(**kw):
    from methods.clove import CLoVEConfig

    base = dict(proj_hidden_dim=64, proj_dim=32, attn_heads=4, n_local=2, global_size=32, local_size=16)
    base.update(kw)
    return CLoVEConfig(**base)


def _method(cfg, backbone="vit_tiny_d4_p8", total=10):
    from bench.backbones import create_backbone
    from methods.base import Schedule
    from methods.clove import CLoVE

    return CLoVE(cfg, lambda: create_backbone(backbone), Schedule(total_steps=total, steps_per_epoch=total, epochs=1))


def _batch(method, n, seed=0):
    from bench.data.synthetic import SyntheticConfig, SyntheticScenes
    from bench.data.views import MultiCrop, collate_views

    torch.manual_seed(seed)
    ds = SyntheticScenes(SyntheticConfig(num_train=n, num_val=1), "train")
    return collate_views([MultiCrop(method.view_spec())(ds[i]["image"]) for i in range(n)])


def _swap_globals(batch):
    out = dict(batch)
    v = list(batch["views"])
    out["views"] = [v[1], v[0]] + v[2:]
    order = [1, 0] + list(range(2, len(v)))
    out["boxes"] = batch["boxes"][:, order]
    out["flips"] = batch["flips"][:, order]
    return out


def test_loss_is_invariant_to_swapping_the_global_views():
    torch.manual_seed(0)
    method = _method(_small_cfg())
    batch = _batch(method, 4)
    a = method(batch, 0)
    b = method(_swap_globals(batch), 0)
    assert abs(float(a["loss"]) - float(b["loss"])) < 1e-4
    assert 99.0 < float(a["loss"]) < 101.0  # the μ = 100 offset at initialisation
    # swapping the two local views is a symmetry too; mirroring one global's flip flag is not
    c = dict(batch)
    order = [0, 1, 3, 2]
    c["views"] = [batch["views"][i] for i in order]
    c["boxes"], c["flips"] = batch["boxes"][:, order], batch["flips"][:, order]
    assert abs(float(method(c, 0)["loss"]) - float(a["loss"])) < 1e-4
    d = dict(batch)
    d["flips"] = batch["flips"].clone()
    d["flips"][:, 0] = ~d["flips"][:, 0]
    assert abs(float(method(d, 0)["loss"]) - float(a["loss"])) > 1e-4


def test_momentum_schedule_ema_and_gradients():
    import numpy as np

    from methods.common.schedules import momentum_schedule

    torch.manual_seed(0)
    method = _method(_small_cfg(momentum=0.9), total=4)
    assert all(not p.requires_grad for p in method.momentum_encoder.parameters())
    batch = _batch(method, 2)
    out = method(batch, 0)
    out["loss"].backward()
    # gradients reach the backbone, projector and attention; never the momentum branch
    assert method.online.backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert method.predictor.in_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.momentum_encoder.parameters())
    with torch.no_grad():
        for p in method.online.parameters():
            p.add_(0.5)
    before = [p.clone() for p in method.momentum_encoder.parameters()]
    method.after_step(0)  # uses the momentum of iteration 1
    m = float(momentum_schedule(0.9, 4)[1])
    assert abs(m - (1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)) < 1e-12
    for b, t, s in zip(before, method.momentum_encoder.parameters(), method.online.parameters()):
        assert torch.allclose(t, m * b + (1 - m) * s, atol=1e-6)
    assert np.isclose(out["momentum"], 0.9)
    snap = [p.clone() for p in method.momentum_encoder.parameters()]
    method.after_step(3)  # last step: no iteration 4 to prepare
    assert all(torch.equal(a, b) for a, b in zip(snap, method.momentum_encoder.parameters()))


def test_resnet_backbone_and_evaluation_branches():
    torch.manual_seed(0)
    method = _method(_small_cfg(global_size=64, local_size=32, n_local=1), backbone="resnet18")
    batch = _batch(method, 2)
    out = method(batch, 0)
    assert torch.isfinite(out["loss"]) and 99.0 < float(out["loss"]) < 101.0
    out["loss"].backward()
    assert method.eval_backbone() is method.online.backbone
    assert method.dense_features(batch["views"][0]).shape == (2, 512, 2, 2)
    mom = _method(_small_cfg(global_size=64, local_size=32, eval_branch="momentum"), backbone="resnet18")
    assert mom.eval_backbone() is mom.momentum_encoder.backbone
    with pytest.raises(BenchError, match="global_size"):
        _method(_small_cfg(global_size=32), backbone="resnet18")


def test_bad_config_is_one_clear_error():
    from bench.config import build
    from methods.clove import CLoVEConfig

    for bad, pattern in [({"n_neg": 1}, "n_neg"), ({"pos_ratio": 0}, "pos_ratio"), ({"attn_heads": 3}, "attn_heads"),
                         ({"momentum": 1.5}, "momentum"), ({"eval_branch": "teacher"}, "eval_branch"),
                         ({"local_scale": [0.5, 0.2]}, "local_scale"), ({"attn_temp": -1}, "attn_temp")]:
        with pytest.raises(BenchError, match=pattern):
            build(CLoVEConfig, bad, "methods.clove")


def test_search_space_names_config_fields():
    import dataclasses

    from methods.clove import CLoVE, CLoVEConfig

    space = CLoVE.search_space()
    fields = {f.name for f in dataclasses.fields(CLoVEConfig)}
    assert {"margin", "pos_ratio", "n_neg", "momentum", "attn_temp"} <= set(space) <= fields


def test_lars_matches_the_reference_rule_by_hand():
    from bench.config import PretrainConfig
    from bench.optim import build_optimizer

    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ‖w‖ = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    cfg = PretrainConfig(optimizer="lars", lr=0.5, weight_decay=0.1, momentum=0.9)
    opt = build_optimizer([{"params": [w]}, {"params": [b], "apply_wd": False}], cfg)
    opt.step()
    # weight: g + wd·w = [0.3, 1.4]; trust = 1e-3 · 5 / (‖[0.3, 1.4]‖ + 1e-8); step = lr · trust · g'
    g = torch.tensor([[0.3, 1.4]])
    trust = 1e-3 * 5 / (float(g.norm()) + 1e-8)
    assert torch.allclose(w.detach(), torch.tensor([[3.0, 4.0]]) - 0.5 * trust * g, atol=1e-7)
    # 1-D: no weight decay, no trust scaling
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 2.0]))
    # the reference recipe is a valid pretrain section that selects LARS
    from bench.config import build
    from bench.optim import LARS
    from methods.clove import REFERENCE_PRETRAIN

    ref = build(PretrainConfig, REFERENCE_PRETRAIN, "pretrain")
    assert ref.optimizer == "lars" and ref.clip_grad == 0 and ref.weight_decay == ref.weight_decay_end
    assert isinstance(build_optimizer([{"params": [torch.nn.Parameter(torch.ones(2, 2))]}], ref), LARS)


# ----------------------------------------------------------------------------------- training

def test_short_pretraining_run_decreases_the_loss(tmp_path, monkeypatch):
    import bench.pretrain as pretrain

    # in a plain process the worker-placement record would start a local Ray instance just to name the node
    monkeypatch.setattr(pretrain, "_record_worker", lambda *args: None, raising=False)
    cfg = {"proj_hidden_dim": 128, "proj_dim": 64, "n_local": 1, "global_size": 32, "local_size": 16}
    res = pretrain.train_loop({
        "method": "clove", "method_cfg": cfg,
        "pretrain": {"epochs": 1, "steps_per_epoch": 20, "batch_size": 8, "log_every": 1, "lr": 1e-3,
                     "warmup_epochs": 0.0, "weight_decay": 0.0, "weight_decay_end": 0.0, "clip_grad": 0.0,
                     "checkpoint_every": 1000},
        "backbone": {}, "dataset": "synthetic", "dataset_cfg": {"num_train": 64, "num_val": 2},
        "seed": 0, "out_dir": str(tmp_path)})
    rows = pretrain.read_metrics(str(tmp_path))
    losses = [r["loss"] for r in rows]
    assert res["steps"] == 20 and len(losses) == 20
    assert 99.5 < losses[0] < 100.5
    # the positive term (−2·mean positive similarity) falls as matching cells align
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.15, losses
    pos = [r["pos_term"] for r in rows]
    assert sum(pos[-5:]) / 5 < sum(pos[:5]) / 5, pos


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dp_worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist


    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    data = torch.load(path, weights_only=False)
    torch.manual_seed(0)
    method = _method(_small_cfg())
    per = data["batch"]["boxes"].shape[0] // world
    sl = slice(rank * per, (rank + 1) * per)
    batch = {"views": [v[sl] for v in data["batch"]["views"]], "boxes": data["batch"]["boxes"][sl],
             "flips": data["batch"]["flips"][sl], "size": data["batch"]["size"][sl]}
    out = method(batch, 0)
    out["loss"].backward()
    grads = {}
    for n, p in method.named_parameters():
        if p.grad is not None:
            g = p.grad.clone()
            dist.all_reduce(g)
            grads[n] = g / world  # what DDP does
    if rank == 0:
        torch.save({"loss": float(out["loss"]), "grads": grads}, path + ".out")
    dist.destroy_process_group()


def test_two_workers_match_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    method = _method(_small_cfg())
    batch = _batch(method, 4)
    path = str(tmp_path / "batch.pt")
    torch.save({"batch": batch}, path)
    out = method(batch, 0)
    out["loss"].backward()
    mp.spawn(_dp_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    got = torch.load(path + ".out", weights_only=False)
    assert abs(got["loss"] - float(out["loss"])) < 1e-4
    ref = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    assert ref.keys() == got["grads"].keys()
    # projector BN statistics are global: without them the projector gradients would differ
    for n, g in ref.items():
        assert torch.allclose(got["grads"][n], g, atol=1e-5, rtol=1e-3), n
    assert os.path.exists(path + ".out")
