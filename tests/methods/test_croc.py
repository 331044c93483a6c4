"""CrOC: key extraction, the joint-space clustering (cost, Sinkhorn marginals, merge, K selection, positional
term), centroids and the object-level loss by hand, the method's step, freezing and a short pretraining run."""

import math

import pytest
import torch
from torch.nn import functional as F

from bench.backbones import create_backbone
from bench.config import BackboneConfig, build
from bench.errors import BenchError
from methods.base import Schedule
from methods.common.dist import global_mean
from methods.croc import clustering as cl
from methods.common.dino_loss import DINOLoss
from methods.common.sinkhorn import sinkhorn_plan
from methods.common.vit_tokens import tokens_and_head_features


def _softmax(xs, t=1.0):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


# ------------------------------------------------------------------------------------------ keys


def test_last_block_keys_equal_a_manual_computation():
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny_d4_p8").eval()
    x = torch.randn(2, 3, 64, 64)
    tokens, keys = tokens_and_head_features(bb, x, "k")
    m = bb.model
    with torch.no_grad():
        h = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        for blk in m.blocks[:-1]:
            h = blk(h)
        y = m.blocks[-1].norm1(h)  # 2×65×192
        c = m.embed_dim
        w, b = m.blocks[-1].attn.qkv.weight, m.blocks[-1].attn.qkv.bias
        k = y @ w[c:2 * c].t() + b[c:2 * c]  # rows c..2c of the fused projection are the keys
        heads = m.blocks[-1].attn.num_heads
        k = k.view(2, 65, heads, c // heads).transpose(1, 2)
    assert keys.shape == (2, 3, 65, 64)
    assert torch.allclose(keys, k, atol=1e-5)
    assert torch.allclose(tokens, m.forward_features(x), atol=1e-6)
    q = tokens_and_head_features(bb, x, "q")[1]
    assert not torch.allclose(q, keys)  # q / k / v are distinct slices
    with pytest.raises(BenchError, match="which_features"):
        tokens_and_head_features(bb, x, "last")


# ------------------------------------------------------------------------------------------ cost matrix


def test_cost_matrix_on_hand_built_tokens_and_positions():
    # problem 0: three tokens, two centroids (the second key is not unit: the cost uses its direction)
    keys0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    cents0 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    pos0 = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    cpos0 = torch.tensor([[0.0, 0.0], [6.0, 8.0]])
    # by hand, λ_pos = 2: distances [[0,10],[5,5],[10,0]] / 10; sims [[1,0],[0,1],[.6,.8]]
    raw0 = [[-1.0, 2.0], [1.0, 0.0], [1.4, -0.8]]
    got = cl.cost_matrix(keys0[None], cents0[None], pos0[None], cpos0[None], lambda_pos=2.0)[0]
    lo, hi = -1.0, 2.0
    assert torch.allclose(got, (torch.tensor(raw0) - lo) / (hi - lo), atol=1e-6)

    # a second problem with a wider range: the min-max is over the whole batch, not per problem
    keys1 = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
    cents1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos1 = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    cpos1 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    # distances [[0,0],[1,1],[2,2]] / 2; sims [[-1,0],[0,-1],[1,0]] -> raw = -sim + 2·D
    raw1 = [[1.0, 0.0], [1.0, 2.0], [1.0, 2.0]]
    both = cl.cost_matrix(torch.stack([keys0, keys1]), torch.stack([cents0, cents1]), torch.stack([pos0, pos1]),
                          torch.stack([cpos0, cpos1]), lambda_pos=2.0)
    lo, hi = -1.0, 2.0  # the same extremes happen to hold; now make problem 1 reach 3.0
    assert torch.allclose(both[1], (torch.tensor(raw1) - lo) / (hi - lo), atol=1e-6)
    pos1b = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 4.0]])  # D = [[0,0],[0,0],[1,1]] -> raw [[1,0],[0,1],[1,2]]
    keys1b = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [-1.0, 0.0]])  # sims [[-1,0],[0,-1],[-1,0]]
    raw1b = [[1.0, 0.0], [0.0, 1.0], [3.0, 2.0]]
    both = cl.cost_matrix(torch.stack([keys0, keys1b]), torch.stack([cents0, cents1]), torch.stack([pos0, pos1b]),
                          torch.stack([cpos0, cpos1]), lambda_pos=2.0)
    lo, hi = -1.0, 3.0
    assert torch.allclose(both[0], (torch.tensor(raw0) - lo) / (hi - lo), atol=1e-6)
    assert torch.allclose(both[1], (torch.tensor(raw1b) - lo) / (hi - lo), atol=1e-6)


def test_position_distance_is_normalised_per_problem():
    pos = torch.tensor([[[0.0, 0.0], [3.0, 4.0]], [[0.0, 0.0], [30.0, 40.0]]])
    cpos = torch.zeros(2, 1, 2)
    d = cl.position_distance(pos, cpos)
    assert torch.allclose(d, torch.tensor([[[0.0], [1.0]], [[0.0], [1.0]]]))


# ------------------------------------------------------------------------------------------ Sinkhorn


def test_sinkhorn_one_iteration_by_hand_and_marginals():
    cost = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])
    a, b = torch.tensor([[0.3, 0.7]]), torch.tensor([[0.6, 0.4]])
    lam = 2.0
    e = [[math.exp(-lam * c) for c in row] for row in cost[0].tolist()]
    tot = sum(map(sum, e))
    p = [[v / tot for v in row] for row in e]
    p = [[v * a[0, i].item() / sum(row) for v in row] for i, row in enumerate(p)]  # rows to a
    cols = [p[0][k] + p[1][k] for k in range(2)]
    p = [[row[k] * b[0, k].item() / cols[k] for k in range(2)] for row in p]  # then columns to b
    got = sinkhorn_plan(cost, a, b, lam=lam, n_iter=1)
    assert torch.allclose(got[0], torch.tensor(p), atol=1e-6)


def test_sinkhorn_plan_has_the_croc_marginals():
    torch.manual_seed(0)
    keys = F.normalize(torch.randn(4, 2, 8, 6), dim=-1)
    cls_keys = F.normalize(torch.randn(4, 2, 6), dim=-1)
    r = cl.token_scores(keys, cls_keys)
    a = F.softmax(r / 2.0, dim=1)  # token marginal: a [CLS]-similarity prior
    seeds = cl.sample_seeds(r / 2.0, 5, torch.rand(4, 16))
    b = F.softmax(r.gather(1, seeds) / 2.0, dim=1)
    cost = torch.rand(4, 16, 5)
    few = sinkhorn_plan(cost, a, b, lam=20.0, n_iter=5)
    # the last scaling is over columns: columns match b exactly, rows only approximately after 5 iterations
    assert torch.allclose(few.sum(dim=1), b, atol=1e-6)
    assert torch.allclose(few.sum(dim=(1, 2)), torch.ones(4), atol=1e-5)
    many = sinkhorn_plan(cost, a, b, lam=20.0, n_iter=500)
    assert torch.allclose(many.sum(dim=2), a, atol=1e-5)
    assert torch.allclose(many.sum(dim=1), b, atol=1e-6)


def test_seed_sampling_follows_the_marginal_without_replacement():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    idx = cl.sample_seeds(logits, 2, torch.rand(20000, 4, generator=g))
    assert all(len(set(row)) == 2 for row in idx[:200].tolist())
    first = torch.bincount(idx[:, 0], minlength=4).float() / 20000
    assert torch.allclose(first, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)
    # second draw given first = 0: proportional to the rest, P(second = 1 | first = 0) = 0.3 / 0.5
    sel = idx[idx[:, 0] == 0]
    assert abs(float((sel[:, 1] == 1).float().mean()) - 0.6) < 0.02


# ------------------------------------------------------------------------------------------ merge, K, split


def test_merge_joins_the_most_similar_centroids_and_appends_them_last():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])[None]  # 1 problem, 3 tokens
    plan = torch.tensor([[0.3, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.4]])[None]  # cluster k = token k
    merged = cl.merge_most_similar(plan, keys)
    # centroids are the tokens: columns 0 and 2 are the most similar pair -> [P1, P0 + P2]
    assert torch.allclose(merged[0], torch.tensor([[0.0, 0.3], [0.3, 0.0], [0.0, 0.4]]))


def test_cluster_count_selection_picks_the_lowest_cost_candidate():
    # columns: K = 5, 4, 3, 2
    costs = torch.tensor([[0.1, 0.5, 0.3, 0.4],   # K=5 is cheapest but never eligible with k_max 4 -> K=3
                          [0.9, 0.2, 0.3, 0.4],   # -> K=4
                          [0.9, 0.5, 0.5, 0.1],   # -> K=2
                          [0.9, 0.3, 0.3, 0.3]])  # ties -> the first eligible, K=4
    assert cl.select_k(costs, n_seeds=5, k_max=4).tolist() == [3, 4, 2, 4]
    assert cl.select_k(costs, n_seeds=5, k_max=5).tolist() == [5, 4, 2, 4]
    assert cl.select_k(costs, n_seeds=5, k_max=2).tolist() == [2, 2, 2, 2]


def _random_problem(p=6, n=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(p, 2, n + 1, d, generator=g)
    side = int(math.sqrt(n))
    yy, xx = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    grid = torch.stack([xx, yy], dim=-1).reshape(n, 2).float() * 8
    positions = torch.stack([grid, grid + 12.0], dim=0).expand(p, 2, n, 2)
    noise = torch.rand(p, 2 * n, generator=g)
    return keys[:, :, 1:], keys[:, :, 0], positions, noise


def test_clustering_invariants_and_chosen_k():
    keys, cls_keys, pos, noise = _random_problem()
    res = cl.cluster_views(keys, cls_keys, pos, noise)
    p, n = keys.shape[0], keys.shape[2]
    assert res.weights.shape == (p, 2, n, 4) and res.costs.shape == (p, 4)
    # K* is the cheapest eligible candidate, and only its first K* columns carry weight
    assert res.n_clusters.tolist() == (4 - res.costs[:, 1:].argmin(dim=1)).tolist()
    assert set(res.n_clusters.tolist()) <= {2, 3, 4}
    for i, k in enumerate(res.n_clusters.tolist()):
        assert torch.count_nonzero(res.weights[i, :, :, k:]) == 0
    # hard mask: each token keeps exactly one cluster; kept weights are view-normalised soft values (<= 1)
    assert torch.all((res.weights > 0).sum(dim=-1) == 1)
    assert torch.all(res.weights <= 1 + 1e-6)
    # valid clusters hold tokens of both views, invalid ones miss at least one view
    mass = res.weights.sum(dim=2)  # P×2×K
    assert torch.equal(res.valid, (mass > 0).all(dim=1))
    assert res.valid.any()


def _two_groups_checkerboard(side=4):
    """One problem: two views of the same 4×4 grid; keys alternate between two directions like a checkerboard,
    so the semantic groups are spatially interleaved. Returns keys, cls keys, positions, noise."""
    n = side * side
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    group = ((xx + yy) % 2).reshape(n)
    e = torch.eye(4)
    keys = torch.where(group[:, None] == 0, e[0], e[1]) + 0.05 * e[2]
    keys = torch.stack([keys, keys])[None]  # 1×2×N×4
    cls_keys = (e[0] + e[1] + e[2]).expand(1, 2, 4)  # equal prior for both groups
    pos = torch.stack([xx, yy], -1).reshape(n, 2).float() * 16 + 8
    pos = torch.stack([pos, pos])[None]
    noise = torch.linspace(0.05, 0.95, 2 * n)[torch.randperm(2 * n, generator=torch.Generator().manual_seed(1))]
    return keys, cls_keys, pos, noise[None], group


def _spread(res, pos):
    """Mean distance of each token to its cluster's mean position (joint over views)."""
    w = res.weights[0].reshape(-1, res.weights.shape[-1])  # 2N×K
    p = pos[0].reshape(-1, 2)
    assign = w.argmax(dim=1)
    total = 0.0
    for k in assign.unique():
        members = p[assign == k]
        total += float((members - members.mean(0)).norm(dim=1).sum())
    return total / len(p), assign


def test_lambda_pos_zero_is_purely_semantic_and_large_lambda_is_spatially_compact():
    keys, cls_keys, pos, noise, group = _two_groups_checkerboard()
    kw = dict(n_seeds=5, k_max=4, sinkhorn_lambda=20.0)
    sem = cl.cluster_views(keys, cls_keys, pos, noise, lambda_pos=0.0, **kw)
    # λ_pos = 0: positions play no role at all
    shuffled = pos[:, :, torch.randperm(pos.shape[2], generator=torch.Generator().manual_seed(3))]
    sem2 = cl.cluster_views(keys, cls_keys, shuffled, noise, lambda_pos=0.0, **kw)
    assert torch.equal(sem.weights, sem2.weights)
    # ... and every cluster is semantically pure
    spread_sem, assign = _spread(sem, pos)
    joint_group = torch.cat([group, group])
    for k in assign.unique():
        assert joint_group[assign == k].unique().numel() == 1
    # a large λ_pos makes clusters spatial: mixed groups, much smaller spatial spread
    spa = cl.cluster_views(keys, cls_keys, pos, noise, lambda_pos=50.0, **kw)
    spread_spa, assign = _spread(spa, pos)
    assert any(joint_group[assign == k].unique().numel() == 2 for k in assign.unique())
    assert spread_spa < 0.75 * spread_sem


# ------------------------------------------------------------------------------------------ centroids, loss


def test_object_level_loss_on_a_tiny_case_by_hand():
    # 1 image, 1 head, N = 2 tokens per view, K = 2, C = 3
    z_t = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], [[[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]]])  # 2×1×2×3
    z_s = torch.tensor([[[[0.5, 0.0, 0.5], [0.0, 2.0, 0.0]]], [[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]]])
    w = torch.zeros(1, 2, 2, 2)
    w[0, 0, 0, 0], w[0, 0, 1, 1] = 0.6, 1.0  # view 1: token 0 -> cluster 0, token 1 -> cluster 1
    w[0, 1, 0, 0], w[0, 1, 1, 0] = 0.3, 0.7  # view 2: both tokens -> cluster 0; cluster 1 is missing
    valid = (w.sum(dim=2) > 0).all(dim=1)
    assert valid.tolist() == [[True, False]]
    t1, t2 = cl.view_centroids(z_t, w, valid, torch.tensor(2.0))
    s1, s2 = cl.view_centroids(z_s, w, valid, torch.tensor(3.0))
    # by hand: view-1 centroid of cluster 0 = 0.6·z_0 -> direction z_0; view 2 = 0.3·z_0' + 0.7·z_1'
    v = [0.7, 0.7, 0.3]
    nv = math.sqrt(sum(x * x for x in v))
    assert torch.allclose(t1, torch.tensor([[2.0, 0.0, 0.0]]))
    assert torch.allclose(t2, torch.tensor([[2 * x / nv for x in v]]), atol=1e-6)
    sv1 = [0.3, 0.0, 0.3]
    sv2 = [0.3, 0.7, 0.7]
    n1, n2 = math.sqrt(sum(x * x for x in sv1)), math.sqrt(sum(x * x for x in sv2))
    s1_hand = [3 * x / n1 for x in sv1]
    s2_hand = [3 * x / n2 for x in sv2]
    assert torch.allclose(s1, torch.tensor([s1_hand]), atol=1e-6)
    assert torch.allclose(s2, torch.tensor([s2_hand]), atol=1e-6)
    # the object loss (identity head): ½[H(T1, S2) + H(T2, S1)], T = softmax((t − c)/τ_t), S = softmax(s/τ_s)
    loss_fn = DINOLoss(out_dim=3, teacher_temp=0.5, warmup_teacher_temp=0.5, student_temp=0.25)
    loss_fn.center.copy_(torch.tensor([[0.1, -0.2, 0.0]]))
    c = [0.1, -0.2, 0.0]
    t1h, t2h = t1[0].tolist(), t2[0].tolist()

    def h(t, s):
        q = _softmax([a - b for a, b in zip(t, c)], 0.5)
        p = _softmax(s, 0.25)
        return -sum(qi * math.log(pi) for qi, pi in zip(q, p))

    expected = 0.5 * (h(t1h, s2_hand) + h(t2h, s1_hand))
    got = loss_fn([s1, s2], [t1, t2], epoch=0)
    assert abs(float(got) - expected) < 1e-5
    # centring over the 2·n_valid teacher centroids: c ← 0.9 c + 0.1 mean
    mean = [(a + b) / 2 for a, b in zip(t1h, t2h)]
    assert torch.allclose(loss_fn.center[0], torch.tensor([0.9 * a + 0.1 * m for a, m in zip(c, mean)]), atol=1e-6)


def test_global_mean_is_a_plain_mean_with_gradient_in_one_process():
    x = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    m = global_mean(x)
    m.backward()
    assert float(m) == 3.0 and torch.allclose(x.grad, torch.full((3,), 1 / 3))


# ------------------------------------------------------------------------------------------ the method


def _method(**cfg):
    from methods.build import build_method

    small = {"out_dim": 64, "out_dim_c": 32, "hidden_dim": 32, "bottleneck_dim": 16}
    small.update(cfg)
    torch.manual_seed(0)
    return build_method("croc", small, BackboneConfig(), Schedule(total_steps=10, steps_per_epoch=2, epochs=5))


def _batch(method, b=4, seed=0):
    from bench.data.views import build_view_transform, collate_views

    torch.manual_seed(seed)
    tf = build_view_transform(method.view_spec())
    imgs = [torch.randint(0, 255, (3, 96, 96), dtype=torch.uint8) for _ in range(b)]
    batch = collate_views([tf(i) for i in imgs])
    batch["index"] = torch.arange(b)
    return batch


def test_view_spec_is_the_reference_recipe():
    spec = _method().view_spec()
    assert (spec.n_global, spec.n_local, tuple(spec.global_scale)) == (2, 0, (0.25, 1.0))
    assert spec.blur_p[:2] == (1.0, 0.1) and spec.solarize_p[:2] == (0.0, 0.2)
    assert not spec.same_box_for_globals


def test_training_step_losses_freezing_and_determinism():
    m = _method().train()
    # the teacher never drops paths (tests/methods/test_teacher.py checks it with drop_path > 0)
    assert all(getattr(mod, 'drop_prob', 0.0) == 0.0 for mod in m.teacher.modules())
    batch = _batch(m)
    out = m(batch, 0)
    assert torch.isfinite(out["loss"])
    assert abs(float(out["loss"]) - (out["loss_image"] + out["loss_object"])) < 1e-5
    assert out["loss_object"] > 0 and 2 <= out["clusters"] <= 4
    assert 0 < out["valid_per_image"] <= 3 * 4  # at most h·K* pairs per image
    out["loss"].backward()
    head = m.student.head
    assert head.last_layer_c.parametrizations.weight.original1.grad is not None  # object loss reaches it
    m.on_after_backward(step=0)  # epoch 0: both output layers are frozen
    assert all(p.grad is None for p in head.last_layer_params())
    assert len(head.last_layer_params()) == 4  # gain and direction of last_layer and of last_layer_c
    m.zero_grad()
    m(batch, 2)["loss"].backward()
    m.on_after_backward(step=2)  # epoch 1
    assert all(p.grad is not None for p in head.last_layer_params() if p.requires_grad)
    assert sum(p.requires_grad for p in head.last_layer_params()) == 2  # the gains stay fixed at 1
    # the seed draw depends on (run, step, sample) only
    m2 = _method().train()
    torch.manual_seed(123)  # the global generator does not matter
    a = m2(batch, 0)
    assert abs(a["loss_object"] - out["loss_object"]) < 1e-5 and a["clusters"] == out["clusters"]


def test_positions_follow_boxes_and_flips():
    m = _method()
    batch = {"boxes": torch.tensor([[[0.0, 0.0, 64.0, 32.0], [10.0, 20.0, 42.0, 52.0]]]),
             "flips": torch.tensor([[False, True]])}
    pos = m._positions(batch, (2, 2), "cpu")  # 1×2×4×2
    assert torch.allclose(pos[0, 0], torch.tensor([[16.0, 8.0], [48.0, 8.0], [16.0, 24.0], [48.0, 24.0]]))
    assert torch.allclose(pos[0, 1], torch.tensor([[34.0, 28.0], [18.0, 28.0], [34.0, 44.0], [18.0, 44.0]]))


def test_spatial_clusters_agree_across_views_in_source_coordinates():
    """With a dominant positional term, tokens of the two views that cover the same source pixels fall in the
    same cluster: the positions must honour each view's box and its flip."""
    m = _method()
    boxes = torch.tensor([[[0.0, 0.0, 64.0, 64.0], [16.0, 16.0, 80.0, 80.0]]])
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 64, 8, generator=g)
    cls_keys = torch.randn(1, 2, 8, generator=g)
    noise = torch.rand(1, 128, generator=g)
    # view-1 token (i, j) covers the same source patch as view-2 token (i − 2, 9 − j) when view 2 is mirrored
    pairs = [(i * 8 + j, (i - 2) * 8 + (9 - j)) for i in range(2, 8) for j in range(2, 8)]

    def agreement(flip_seen_by_method):
        pos = m._positions({"boxes": boxes, "flips": torch.tensor([[False, flip_seen_by_method]])}, (8, 8), "cpu")
        res = cl.cluster_views(keys, cls_keys, pos, noise, lambda_pos=50.0)
        assign = res.weights[0].argmax(dim=-1)  # 2×64
        return sum(int(assign[0, a] == assign[1, b]) for a, b in pairs) / len(pairs)

    right, wrong = agreement(True), agreement(False)
    assert right >= 0.8  # tokens on cluster borders may go either way
    assert wrong < right - 0.2  # ignoring the flip breaks the correspondence


def test_config_validation_is_one_clear_error():
    from methods.croc import CrOCConfig

    with pytest.raises(BenchError, match="n_centroids_max"):
        build(CrOCConfig, {"n_tokens": 3, "n_centroids_max": 4}, "methods.croc")
    with pytest.raises(BenchError, match="which_features"):
        build(CrOCConfig, {"which_features": "x"}, "methods.croc")
    with pytest.raises(BenchError, match="sinkhorn_lambda"):
        build(CrOCConfig, {"sinkhorn_lambda": 0}, "methods.croc")
    from methods.build import build_method

    with pytest.raises(BenchError, match="ViT"):
        build_method("croc", {}, BackboneConfig(name="resnet18"), Schedule(1, 1, 1))


def test_search_space_covers_the_issue_knobs():
    from methods.croc import CrOC

    space = CrOC.search_space()
    for key in ("lambda_pos", "teacher_temp", "student_temp", "n_centroids_max", "n_tokens", "sinkhorn_lambda"):
        assert key in space


def test_short_pretraining_decreases_the_loss(tmp_path):
    from bench.pretrain import read_metrics, train_loop

    cfg = {"method": "croc", "method_cfg": {"out_dim": 128, "out_dim_c": 64, "hidden_dim": 64, "bottleneck_dim": 32},
           "pretrain": {"epochs": 1, "steps_per_epoch": 16, "batch_size": 8, "log_every": 1, "warmup_epochs": 0.1,
                        "checkpoint_every": 1000},
           "backbone": {}, "dataset": "synthetic", "dataset_cfg": {"num_train": 64, "num_val": 2}, "seed": 0,
           "out_dir": str(tmp_path)}
    res = train_loop(cfg)
    losses = [r["loss"] for r in read_metrics(str(tmp_path))]
    assert res["steps"] == 16 and len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
