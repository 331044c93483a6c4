"""Methods by name: build one for training, rebuild a trained one from ``final.pt`` for evaluation.

The harness (the loop, evaluation, export, tests) goes through these three functions instead of reaching into
the registry and config classes itself, so building a method is written once.
"""

from __future__ import annotations

from bench import checkpoint as ckpt
from bench.backbones import create_backbone
from bench.config import BackboneConfig, PretrainConfig, build
from bench.errors import BenchError
from bench.registry import METHODS
from methods.base import Method, Schedule


def build_method(name: str, method_cfg, backbone_cfg: BackboneConfig, schedule: Schedule) -> Method:
    """The registered method ``name`` on a fresh backbone; ``method_cfg``: plain data (validated here as
    ``methods.<name>``) or an already validated instance of the method's ``config_class``."""
    cls = METHODS.get(name)
    cfg = method_cfg if isinstance(method_cfg, cls.config_class) else build(cls.config_class, method_cfg,
                                                                             f"methods.{name}")

    def factory():
        return create_backbone(backbone_cfg.name, backbone_cfg.init, backbone_cfg.drop_path, backbone_cfg.output_stride)

    return cls(cfg, factory, schedule)


def plan_schedule(pcfg: PretrainConfig, n_images: int, world: int) -> Schedule:
    """Steps per epoch (``pretrain.steps_per_epoch`` or one pass over ``n_images`` at the global batch) × epochs."""
    spe = pcfg.steps_per_epoch or max(n_images // pcfg.batch_size, 1)
    return Schedule(total_steps=spe * pcfg.epochs, steps_per_epoch=spe, epochs=pcfg.epochs, world_size=world)


def load_trained_method(final_path: str, method_cfg: dict, backbone_cfg: BackboneConfig, pcfg: PretrainConfig,
                        n_images: int) -> Method:
    """Rebuild a method from ``final.pt`` for evaluation (CPU, eval mode)."""
    state = ckpt.load_torch(final_path)
    schedule = plan_schedule(pcfg, n_images, 1)
    bcfg = BackboneConfig(name=backbone_cfg.name, init="", drop_path=0.0, output_stride=backbone_cfg.output_stride)
    method = build_method(state["method"], method_cfg, bcfg, schedule)
    missing, unexpected = method.load_state_dict(state["method_state"], strict=False)
    if unexpected or [m for m in missing if "backbone" in m]:
        raise BenchError(f"checkpoint {final_path}: does not match method '{state['method']}' with backbone "
                         f"'{backbone_cfg.name}' ({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    return method.eval()


def eval_backbone_prefix(state: dict, method_cfg: dict | None = None, backbone: str = "") -> str:
    """Where the evaluation backbone sits in ``final.pt``'s ``method_state``: recorded at save time
    (``eval_backbone_prefix``), or, for files written before that key existed, found by building the method."""
    prefix = state.get("eval_backbone_prefix")
    if isinstance(prefix, str):
        return prefix
    return METHODS.get(state["method"]).probe_eval_backbone_prefix(method_cfg or {}, backbone)
