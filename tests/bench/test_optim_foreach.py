"""The AdamW of ``bench.optim.build_optimizer`` runs the multi-tensor (foreach) update, which gives the for-loop
update's parameters bit for bit (the CPU default's numbers do not move), with weight-decay groups and schedules."""

import torch

from bench.config import PretrainConfig
from bench.optim import build_optimizer, set_schedule


def _train(foreach: bool | None) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay}, {"params": no_decay, "apply_wd": False}]
    cfg = PretrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.04)
    opt = build_optimizer(groups, cfg)
    if foreach is not None:  # the reference: the same groups through the for-loop implementation
        assert opt.defaults["foreach"] is True
        opt = torch.optim.AdamW(opt.param_groups, lr=cfg.lr, foreach=foreach)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        set_schedule(opt, 1e-3 * (step + 1), 0.04 + 0.01 * step)
        x = torch.randn(8, 16, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_foreach_adamw_equals_the_for_loop_bit_for_bit():
    ours, loop = _train(None), _train(False)
    assert ours.keys() == loop.keys() and len(ours) == 6
    for k in ours:
        assert torch.equal(ours[k], loop[k]), k
    assert not torch.equal(ours["0.weight"], _train_untouched()["0.weight"])  # training moved the weights


def _train_untouched() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    return model.state_dict()
