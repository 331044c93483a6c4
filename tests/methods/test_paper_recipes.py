"""Each method's built-in ``paper`` recipe holds the spec's constants, ``cpu`` is today's defaults, and the paper
model builds with the published views and head sizes (issue 17)."""

import pytest
import torch

from bench import recipes
from bench.config import load_config, to_dict
from bench.pretrain import build_method
from bench.recipe_tools import recipe_values
from methods.base import Schedule

METHODS = ["dino", "clove", "croc", "leopart", "vice"]

# Transcribed from /work/shared/specs/methods.md (section in the comment), not from the recipe files.
SPEC = {
    "dino": {  # §0.2 (+ the DINO README's ViT-S/16 "boosting" run: teacher_temp 0.07 / 30 warm-up epochs / no last norm)
        # blur_ref_size 0 everywhere: σ U(0.1, 2) in the output crop's pixels, as PIL/torchvision blur (§0.2, §1.2 step 8,
        # §2.2, §3.2, §4.2); warm-up start 0 where the reference warms up from 0 (DINO's cosine_scheduler)
        "backbone.name": "vit_small_p16", "backbone.drop_path": 0.1, "methods.dino.out_dim": 65536,
        "methods.dino.hidden_dim": 2048, "methods.dino.bottleneck_dim": 256, "methods.dino.use_bn_in_head": False,
        "methods.dino.momentum_teacher": 0.996, "methods.dino.teacher_temp": 0.07,
        "methods.dino.warmup_teacher_temp": 0.04, "methods.dino.warmup_teacher_temp_epochs": 30,
        "methods.dino.norm_last_layer": False, "methods.dino.student_temp": 0.1, "methods.dino.center_momentum": 0.9,
        "methods.dino.global_size": 224, "methods.dino.local_size": 96, "methods.dino.n_local": 8,
        "methods.dino.global_scale": [0.4, 1.0], "methods.dino.local_scale": [0.05, 0.4],
        "methods.dino.freeze_last_layer": 1, "methods.dino.embedding": "cls",
        "pretrain.optimizer": "adamw", "pretrain.lr": 0.0005 * 1024 / 256, "pretrain.warmup_epochs": 10.0,
        "pretrain.min_lr": 1e-6, "pretrain.weight_decay": 0.04, "pretrain.weight_decay_end": 0.4,
        "pretrain.clip_grad": 3.0, "backbone.output_stride": 0, "methods.dino.blur_ref_size": 0,
        "pretrain.warmup_start_factor": 0.0},
    "clove": {  # §2.1-2.5
        "backbone.name": "resnet50", "methods.clove.proj_hidden_dim": 4096, "methods.clove.proj_dim": 256,
        "methods.clove.attn_heads": 8, "methods.clove.momentum": 0.99, "methods.clove.pos_ratio": 0.7,
        "methods.clove.n_neg": 10, "methods.clove.lamb": 2.0, "methods.clove.margin": 100.0,
        "methods.clove.global_size": 224, "methods.clove.local_size": 96, "methods.clove.n_local": 6,
        "methods.clove.global_scale": [0.2, 1.0], "methods.clove.local_scale": [0.08, 0.3],
        "pretrain.optimizer": "lars", "pretrain.momentum": 0.9, "pretrain.lr": 2048 / 256 * 1.0,
        "pretrain.min_lr": 0.01 * 2048 / 256, "pretrain.warmup_epochs": 5.0, "pretrain.weight_decay": 2e-5,
        "pretrain.epochs": 400, "backbone.output_stride": 0, "methods.clove.blur_ref_size": 0,
        "pretrain.warmup_start_factor": 0.01},
    "croc": {  # §3.1-3.5
        "backbone.name": "vit_small_p16", "backbone.drop_path": 0.1, "methods.croc.out_dim": 65536,
        "methods.croc.out_dim_c": 8192, "methods.croc.hidden_dim": 2048, "methods.croc.bottleneck_dim": 256,
        "methods.croc.momentum_teacher": 0.996, "methods.croc.teacher_temp": 0.04, "methods.croc.student_temp": 0.1,
        "methods.croc.teacher_temp_c": 0.04, "methods.croc.student_temp_c": 0.1, "methods.croc.alpha_s": 1.0,
        "methods.croc.lambda_pos": 4.0, "methods.croc.n_tokens": 5, "methods.croc.n_centroids_max": 4,
        "methods.croc.sinkhorn_lambda": 20.0, "methods.croc.sinkhorn_iterations": 5,
        "methods.croc.marginals_temp_r": 2.0, "methods.croc.marginals_temp_c": 2.0, "methods.croc.which_features": "k",
        "methods.croc.global_size": 224, "methods.croc.global_scale": [0.25, 1.0],
        "pretrain.lr": 0.0005 * 256 / 256, "pretrain.batch_size": 256, "pretrain.epochs": 300,
        "pretrain.warmup_epochs": 10.0, "pretrain.min_lr": 1e-6, "pretrain.weight_decay_end": 0.4,
        "pretrain.clip_grad": 3.0, "backbone.output_stride": 0, "methods.croc.blur_ref_size": 0,
        "pretrain.warmup_start_factor": 0.0},
    "leopart": {  # §4.1-4.4
        "backbone.name": "vit_small_p16", "backbone.drop_path": 0.1, "methods.leopart.momentum_teacher": 0.9995,
        "methods.leopart.hidden_dim": 2048, "methods.leopart.out_dim": 256, "methods.leopart.n_prototypes": 300,
        "methods.leopart.global_size": 224, "methods.leopart.local_size": 96, "methods.leopart.n_local": 4,
        "methods.leopart.global_scale": [0.25, 1.0], "methods.leopart.local_scale": [0.05, 0.25],
        "methods.leopart.epsilon": 0.05, "methods.leopart.temperature": 0.1, "methods.leopart.sinkhorn_iters": 3,
        "methods.leopart.roi_size": 7, "methods.leopart.loss_mask": "fg", "methods.leopart.fg_threshold": 0.6,
        "methods.leopart.blur_sigma": 0.6, "methods.leopart.blur_kernel": 7, "methods.leopart.queue_length": 8192,
        "methods.leopart.backbone_lr_scale": 0.1, "pretrain.lr": 1e-4, "pretrain.min_lr": 0.0,
        "pretrain.weight_decay": 0.04, "pretrain.weight_decay_end": 0.5, "pretrain.epochs": 50,
        "pretrain.batch_size": 64, "backbone.output_stride": 0, "methods.leopart.blur_ref_size": 0,
        "pretrain.warmup_epochs": 0.0, "pretrain.warmup_start_factor": 0.0},
    "vice": {  # §1.2-1.6
        "backbone.name": "resnet50", "methods.vice.n_views": 5, "methods.vice.view_size": 400,
        "methods.vice.resize_range": [0.5, 1.5], "methods.vice.min_img_size": 500, "methods.vice.region_size": 20,
        "methods.vice.ruler": 10.0, "methods.vice.preserve_ratio": 0.25, "methods.vice.embed_dim": 128,
        "methods.vice.decoder_dim": 256, "methods.vice.n_prototypes": 128, "methods.vice.pooling": "representative",
        "methods.vice.temperature": 0.1, "methods.vice.epsilon": 0.05, "methods.vice.sinkhorn_iters": 3,
        "methods.vice.freeze_prototypes_iters": 313, "methods.vice.queue_length": 160000,
        "methods.vice.queue_start_iter": 313, "pretrain.lr": 0.32, "pretrain.min_lr": 0.00032,
        "pretrain.batch_size": 128, "pretrain.epochs": 12, "pretrain.weight_decay": 1e-6, "pretrain.momentum": 0.9,
        "backbone.output_stride": 8, "methods.vice.trunk": "deeplabv3plus", "methods.vice.aspp_rates": [12, 24, 36],
        "methods.vice.blur_ref_size": 0, "pretrain.optimizer": "larc", "pretrain.warmup_start_factor": 0.02 / 0.32},
}

# published initial weights (§1.3 ViCE: supervised ImageNet; §4.1 Leopart: DINO)
INIT = {"vice": "supervised ImageNet ResNet-50", "leopart": "DINO ViT-S/16"}


def test_every_method_has_a_spec_table():
    assert sorted(SPEC) == sorted(METHODS) and all(len(SPEC[m]) >= 20 for m in METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_paper_holds_the_spec_constants(method):
    got = recipe_values(method, recipes.builtin(method)["paper"])
    wrong = {k: (got.get(k), v) for k, v in SPEC[method].items() if got.get(k) != pytest.approx(v)}
    assert not wrong


@pytest.mark.parametrize("method", METHODS)
def test_paper_names_its_initial_weights(method):
    rec = recipes.builtin(method)["paper"]
    if method in INIT:
        assert INIT[method] in rec.init["weights"] and rec.init["published"].startswith("https://")
    else:
        assert rec.init is None
    assert rec.gpus >= 1 and rec.about and all(rec.sources[k] for k in rec.values)


@pytest.mark.parametrize("method", METHODS)
def test_cpu_recipe_is_todays_defaults(method):
    """``cpu`` changes nothing: its resolved values equal the resolution without any recipe, and it lists every
    field of the method's config (so a new field must be added to it, with its source)."""
    from bench.registry import METHODS as REG
    import dataclasses

    cpu = recipes.builtin(method)["cpu"]
    assert recipe_values(method, cpu) == recipe_values(method, None)
    fields = {f"methods.{method}.{f.name}" for f in dataclasses.fields(REG.get(method).config_class)}
    assert fields <= set(cpu.values)
    assert load_config(None, [], {"run": {"methods": [method]}}).recipes[method].name == "cpu"


def _build(method, recipe="paper", sets=()):
    cfg = load_config(None, list(sets), {"run": {"methods": [method], "recipe": recipe}})
    args = (method, to_dict(cfg.methods[method]), cfg.backbone_for(method), Schedule(10, 10, 1, 1))
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                return build_method(*args)
        except (RuntimeError, NotImplementedError):  # a constructor that needs real values (CrOC)
            return build_method(*args)


def _shapes(module):
    return {tuple(p.shape) for p in module.parameters()}


VIEWS = {"dino": (2, 224, 8, 96), "clove": (2, 224, 6, 96), "leopart": (2, 224, 4, 96), "croc": (2, 224, 0, None)}
HEADS = {"dino": [(65536, 256), (2048, 384), (256, 2048)], "clove": [(4096, 2048, 1, 1), (256, 4096, 1, 1)],
         "leopart": [(300, 256), (2048, 384)], "croc": [(65536, 256), (8192, 256), (2048, 384)]}


@pytest.mark.parametrize("method", ["dino", "clove", "leopart", "croc"])
def test_paper_model_builds_with_the_published_views_and_heads(method):
    m = _build(method)
    spec = m.view_spec()
    n_global, g, n_local, loc = VIEWS[method]
    assert (getattr(spec, "n_global", 2), spec.global_size, getattr(spec, "n_local", 0)) == (n_global, g, n_local)
    if loc:
        assert spec.local_size == loc
    shapes = _shapes(m)
    missing = [s for s in HEADS[method] if s not in shapes and (s[0], *s[1:]) not in shapes]
    # weight-normalised last layers keep their direction as parametrizations.weight.original1
    assert not missing, sorted(shapes, key=len)[:20]


def test_vice_paper_model_builds_the_dilated_deeplabv3plus_trunk():
    """On the meta device (no memory, no compute; a forward gives shapes only) the 400-px paper model builds: a
    ResNet-50 dilated to output stride 8 (layer3 dilation 2, layer4 dilation 4, no stride-2 conv left in them), ASPP
    at rates 12/24/36, the 128-d map at stride 4 and 128 prototypes (spec §1.3)."""
    m = _build("vice")
    assert next(m.parameters()).is_meta  # built on meta: a real 400-px ResNet-50 at OS 8 is too heavy here
    spec = m.view_spec()
    assert (spec.n_views, spec.view_size, spec.blur_ref_size) == (5, 400, 0)
    assert (128, 128) in _shapes(m)
    assert type(m.trunk).__name__ == "DeepLabV3Plus" and m.trunk.backbone.stride == 8
    convs = {n: c for n, c in m.trunk.backbone.named_modules() if isinstance(c, torch.nn.Conv2d)}
    deep = {n: c for n, c in convs.items() if ".layer3." in f".{n}" or ".layer4." in f".{n}"}
    assert deep and all(c.stride == (1, 1) for c in deep.values())
    # the 3×3 convs; a dilated stage's first block keeps the previous stage's dilation (timm and torchvision)
    assert {c.dilation[0] for n, c in deep.items() if "layer3" in n and c.kernel_size == (3, 3)} == {1, 2}
    assert {c.dilation[0] for n, c in deep.items() if "layer4" in n and c.kernel_size == (3, 3)} == {2, 4}
    aspp = sorted(c.dilation[0] for c in m.trunk.aspp.modules() if isinstance(c, torch.nn.Conv2d) and c.dilation[0] > 1)
    assert aspp == [12, 24, 36]
    x = torch.empty(2, 3, 400, 400, device="meta")
    assert tuple(m.trunk.backbone.forward_dense(x).shape) == (2, 2048, 50, 50)  # 400 / 8
    assert tuple(m.trunk.eval()(x).shape) == (2, 128, 100, 100)  # 400 / 4, before the loss's upsampling


def test_vice_paper_without_the_dilation_stops_with_one_line():
    from bench.errors import BenchError

    with pytest.raises(BenchError, match="view_size: 400 must be a multiple of the backbone stride 32"):
        _build("vice", sets=["backbone.output_stride=0"])
    with pytest.raises(BenchError, match="trunk=deeplabv3plus: needs a ResNet backbone at output stride 8 .* at "
                                         "stride 32"):
        _build("vice", sets=["backbone.output_stride=0", "methods.vice.view_size=416"])
