"""Teachers and momentum encoders are deterministic (no stochastic depth / dropout), as in the references, while
the student keeps the harness's drop-path; the EMA momentum lookup is written once."""

from __future__ import annotations

import pytest
import torch

from bench.backbones import create_backbone
from bench.config import build
from bench.registry import METHODS
from methods.base import Schedule
from methods.common.teacher import EMASchedule, make_teacher

# method -> (teacher attribute, a function giving a deterministic-comparable teacher output for a batch of images)
CASES = {
    "dino": ("teacher", lambda t, x: t([x, x])[0]),
    "croc": ("teacher", lambda t, x: t.backbone.model.forward_features(x)),
    "leopart": ("teacher", lambda t, x: t(x)[1]),
    "clove": ("momentum_encoder", lambda t, x: t(x)),
}


def _method(name: str, drop_path: float):
    cls = METHODS.get(name)
    cfg = build(cls.config_class, {}, f"methods.{name}")
    torch.manual_seed(0)
    return cls(cfg, lambda: create_backbone("vit_tiny_d4_p8", drop_path=drop_path),
               Schedule(total_steps=10, steps_per_epoch=5, epochs=2))


@pytest.mark.parametrize("name", sorted(CASES))
def test_teacher_forwards_are_identical_with_drop_path(name):
    assert len(CASES) == 4
    attr, run = CASES[name]
    m = _method(name, drop_path=0.1).train()
    teacher = getattr(m, attr)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = run(teacher, x), run(teacher, x)
    assert torch.equal(a, b), f"{name}: two teacher forwards differ"
    # the student does drop paths (so the check above can fail): its two forwards differ
    student = m.online if name == "clove" else m.student
    with torch.no_grad():
        s1, s2 = run(student, x), run(student, x)
    assert not torch.equal(s1, s2)


def test_make_teacher_zeroes_every_stochastic_layer_but_keeps_the_state():
    net = torch.nn.Sequential(create_backbone("vit_tiny_d4_p8", drop_path=0.2), torch.nn.Dropout(0.3))
    t = make_teacher(net)
    assert all(not p.requires_grad for p in t.parameters())
    assert t.state_dict().keys() == net.state_dict().keys()
    assert max(getattr(mod, "drop_prob", 0.0) for mod in net.modules()) > 0  # the student keeps drop-path
    assert all(getattr(mod, "drop_prob", 0.0) == 0.0 for mod in t.modules()) and t[1].p == 0.0


def test_ema_schedule_is_a_clamped_cosine_to_one():
    ema = EMASchedule(0.996, 5)
    assert ema.momentum(0) == 0.996 and ema.momentum(4) < 1.0 and ema.momentum(99) == ema.momentum(4)
    import math

    assert abs(ema.momentum(2) - (1 - 0.004 * (math.cos(math.pi * 2 / 5) + 1) / 2)) < 1e-12
    s, t = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.996 * t.weight.detach() + 0.004 * s.weight.detach()
    ema.update(t, s, 0)
    assert torch.allclose(t.weight, expected)


def test_croc_loads_a_checkpoint_written_before_its_loss_became_one_module():
    m = _method("croc", drop_path=0.0)
    state = m.state_dict()
    old = {k.replace("loss_fn.image.", "loss_image.").replace("loss_fn.object.", "loss_object."): v.clone()
           for k, v in state.items()}
    old["loss_image.center"].fill_(0.5)
    assert "loss_image.center" in old and "loss_fn.image.center" not in old
    m.load_state_dict(old, strict=True)
    assert torch.all(m.loss_fn.image.center == 0.5)
