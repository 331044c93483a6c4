import math

import numpy as np
import torch

from methods.common.dino_loss import DINOLoss
from methods.common.teacher import ema_update, make_teacher
from methods.common.heads import DINOHead
from methods.common.schedules import cosine_schedule, linear_warmup_constant, momentum_schedule


def _softmax(xs, t):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def test_dino_loss_matches_hand_computation():
    loss_fn = DINOLoss(out_dim=3, teacher_temp=0.5, warmup_teacher_temp=0.5, student_temp=0.25,
                       center_momentum=0.9)
    loss_fn.center.copy_(torch.tensor([[0.1, 0.0, -0.1]]))
    t = [[1.0, 0.0, 0.5], [0.2, 0.4, 0.0]]  # 2 teacher (global) crops, batch of 1
    s = [[0.3, 0.1, 0.0], [0.0, 0.5, 0.2], [1.0, 1.0, 0.0]]  # 3 student crops
    # by hand: pairs (i, v) with v != i, H = -sum_k softmax((t_i - c)/0.5)_k * log softmax(s_v/0.25)_k
    c = [0.1, 0.0, -0.1]
    terms = []
    for i in range(2):
        q = _softmax([a - b for a, b in zip(t[i], c)], 0.5)
        for v in range(3):
            if v == i:
                continue
            p = _softmax(s[v], 0.25)
            terms.append(-sum(qk * math.log(pk) for qk, pk in zip(q, p)))
    expected = sum(terms) / len(terms)  # 4 terms
    got = loss_fn([torch.tensor([x]) for x in s], [torch.tensor([x]) for x in t], epoch=0)
    assert len(terms) == 4
    assert abs(float(got) - expected) < 1e-6
    # centering after the call: c <- 0.9 c + 0.1 mean(teacher outputs)
    mean = np.mean(np.array(t), axis=0)
    assert torch.allclose(loss_fn.center[0], torch.tensor(0.9 * np.array(c) + 0.1 * mean, dtype=torch.float32))


def test_dino_loss_does_not_update_center_in_eval_mode():
    loss_fn = DINOLoss(out_dim=4).eval()
    loss_fn([torch.randn(2, 4)] * 2, [torch.randn(2, 4)] * 2, epoch=0)
    assert torch.count_nonzero(loss_fn.center) == 0


def test_teacher_temperature_warms_up_per_epoch():
    loss_fn = DINOLoss(out_dim=2, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=4, epochs=10)
    assert np.allclose([loss_fn.teacher_temp(e) for e in range(6)], [0.04, 0.05, 0.06, 0.07, 0.07, 0.07])
    assert loss_fn.teacher_temp(100) == 0.07


def test_schedules():
    s = cosine_schedule(1.0, 0.0, total_steps=10, warmup_steps=2, start_warmup=0.0)
    assert len(s) == 10 and s[0] == 0.0 and s[1] == 1.0 and s[2] == 1.0
    assert abs(s[2 + 4] - 0.5) < 1e-9  # half-way through the cosine part
    m = momentum_schedule(0.996, 5)
    assert m[0] == 0.996 and m[-1] < 1.0 and np.all(np.diff(m) > 0)
    assert abs(m[2] - (1 - 0.004 * (math.cos(math.pi * 2 / 5) + 1) / 2)) < 1e-12
    assert linear_warmup_constant(0.04, 0.07, 0, 3).tolist() == [0.07, 0.07, 0.07]


def test_ema_update_formula():
    student = torch.nn.Linear(2, 2)
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    before = teacher.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, 0.9 * before + 0.1 * student.weight)


def test_dino_head_last_layer_gain_is_frozen_and_output_shape():
    head = DINOHead(16, 32, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 32)
    gains = [p for n, p in head.named_parameters() if "original0" in n]
    assert len(gains) == 1 and not gains[0].requires_grad and torch.all(gains[0] == 1)
    free = DINOHead(16, 32, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    assert all(p.requires_grad for p in free.parameters())


def test_dino_training_step_runs_and_freezes_last_layer_in_first_epoch():
    from bench.backbones import create_backbone
    from bench.data.views import MultiCrop, collate_views
    from bench.data.synthetic import SyntheticConfig, SyntheticScenes
    from methods.base import Schedule
    from methods.dino import DINO, DINOConfig

    torch.manual_seed(0)
    cfg = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, n_local=1)
    method = DINO(cfg, lambda: create_backbone("vit_tiny_d4_p8"), Schedule(total_steps=4, steps_per_epoch=2, epochs=2))
    ds = SyntheticScenes(SyntheticConfig(num_train=4, num_val=1), "train")
    batch = collate_views([MultiCrop(method.view_spec())(ds[i]["image"]) for i in range(4)])
    out = method(batch, 0)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    method.on_after_backward(0)
    assert all(p.grad is None for p in method.student.head.last_layer_params())
    assert method.eval_backbone() is method.teacher.backbone
    feats = method.dense_features(batch["views"][0])
    assert feats.shape == (4, 192, 8, 8)


def test_dino_embedding_is_cls_or_the_mean_of_patch_tokens():
    """``embedding=patch_mean`` feeds the head the mean of the patch tokens, so the image-level loss reaches the
    patch tokens' outputs, the dense features that are evaluated (with ``cls`` they get no gradient at all)."""
    from bench.backbones import create_backbone
    from methods.base import Schedule
    from methods.dino import DINO, DINOConfig

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    grads = {}
    for emb in ("cls", "patch_mean"):
        torch.manual_seed(0)
        cfg = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, embedding=emb)
        method = DINO(cfg, lambda: create_backbone("vit_tiny_d4_p8"), Schedule(2, 1, 2))
        pair = method.student
        cls, tokens, _ = pair.backbone.forward_tokens(x)
        want = cls if emb == "cls" else tokens.mean(dim=1)
        assert torch.allclose(pair.embed(x), want, atol=1e-6)
        store = {}

        def keep(mod, args, out):
            out.retain_grad()
            store["out"] = out

        handle = pair.backbone.model.norm.register_forward_hook(keep)
        pair.embed(x).square().sum().backward()
        handle.remove()
        grads[emb] = store["out"].grad[:, 1:].abs()  # the patch tokens' rows of the final norm's output
    assert grads["cls"].max() == 0
    assert (grads["patch_mean"].sum(-1) > 0).all()


def test_dino_config_rejects_unknown_embedding_and_negative_jitter():
    import pytest

    from bench.config import build
    from bench.errors import BenchError
    from methods.dino import DINOConfig

    with pytest.raises(BenchError, match="embedding: expected cls or patch_mean, got 'avg'"):
        build(DINOConfig, {"embedding": "avg"}, "methods.dino")
    with pytest.raises(BenchError, match=r"jitter_strength = -1.0: expected >= 0"):
        build(DINOConfig, {"jitter_strength": -1}, "methods.dino")
