"""detectron2 training entry point: ``python -m tasks.detection.d2_train --config-file CFG.yaml --num-gpus N``.

The only module of the project that imports detectron2; the harness runs it in a subprocess (``det`` with
``backend=detectron2``) or the user runs it through the launch script that ``bench export`` writes.

- Registers ``Res5ROIHeadsExtraNorm`` (the R50-C4 head of MoCo / PixPro: one extra norm layer, of the
  backbone's norm type, after res5 inside the ROI head), which the C4 configs name.
- ``--register NAME=JSON:IMAGE_ROOT`` registers COCO-format datasets (repeatable) in every worker process.
- Evaluators: ``COCOEvaluator(use_fast_impl=False)`` (exact pycocotools, protocols.md §3.4),
  ``CityscapesInstanceEvaluator`` for ``cityscapes_*instance*`` sets, ``PascalVOCDetectionEvaluator`` for VOC.
- ``--metrics-out FILE``: the final evaluation results as JSON (``{"bbox": {"AP": ..}, "segm": {..}}``), read
  back by the ``det`` task.
- ``--lazy``: a LazyConfig ``.py`` (the ViTDet config of ``bench export``), trained with ``SimpleTrainer`` /
  ``AMPTrainer`` and the usual hooks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _register_extra_norm_head() -> None:
    from detectron2.layers import get_norm
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        return

    @ROI_HEADS_REGISTRY.register()
    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """Res5ROIHeads with a norm layer appended after the res5 stage."""

        @classmethod
        def _build_res5_block(cls, cfg):
            seq, out_channels = super()._build_res5_block(cfg)
            seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
            return seq, out_channels


def _register_datasets(specs: list[str]) -> None:
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    for spec in specs:
        name, _, rest = spec.partition("=")
        json_file, _, image_root = rest.partition(":")
        if name and name not in DatasetCatalog.list():
            register_coco_instances(name, {}, json_file, image_root)


def _evaluator(cfg, dataset_name: str, output_folder: str):
    from detectron2.evaluation import CityscapesInstanceEvaluator, COCOEvaluator, PascalVOCDetectionEvaluator

    if "cityscapes" in dataset_name and "instance" in dataset_name:
        return CityscapesInstanceEvaluator(dataset_name)
    if dataset_name.startswith("voc_"):
        return PascalVOCDetectionEvaluator(dataset_name)
    return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=False)


def _plain(results) -> dict:
    out = {}
    for key, value in dict(results or {}).items():
        out[key] = _plain(value) if isinstance(value, dict) else float(value)
    return out


def train_yaml(args) -> dict:
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultTrainer, default_setup

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
            os.makedirs(folder, exist_ok=True)
            return _evaluator(cfg, dataset_name, folder)

    _register_extra_norm_head()
    _register_datasets(args.register)
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(args.opts) + (["OUTPUT_DIR", args.output_dir] if args.output_dir else []))
    cfg.freeze()
    default_setup(cfg, args)
    if args.eval_only:
        from detectron2.checkpoint import DetectionCheckpointer

        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    if not results:  # no final EvalHook result (e.g. TEST.EVAL_PERIOD unset): evaluate once
        results = Trainer.test(cfg, trainer.model)
    return results


def train_lazy(args) -> dict:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate
    from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model, default_setup, default_writers, hooks
    from detectron2.evaluation import inference_on_dataset
    from detectron2.utils import comm

    _register_datasets(args.register)
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, list(args.opts))
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    default_setup(cfg, args)

    def test(model):
        return inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))

    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    if args.eval_only:
        DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        return test(model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, loader, optimizer)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    box: dict = {}

    def evaluate():
        box["results"] = test(model)
        return box["results"]

    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, evaluate),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start, cfg.train.max_iter)
    return box.get("results") or evaluate()


def _main(args) -> None:
    results = train_lazy(args) if args.lazy else train_yaml(args)
    from detectron2.utils import comm

    if args.metrics_out and comm.is_main_process():
        with open(args.metrics_out + ".tmp", "w") as fh:
            json.dump(_plain(results), fh, indent=2)
        os.replace(args.metrics_out + ".tmp", args.metrics_out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tasks.detection.d2_train", description=__doc__.splitlines()[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--lazy", action="store_true", help="the config is a LazyConfig .py file")
    p.add_argument("--output-dir", default="")
    p.add_argument("--register", action="append", default=[], metavar="NAME=JSON:IMAGE_ROOT")
    p.add_argument("--metrics-out", default="")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from detectron2.engine import launch
    except ImportError:
        print("error: detectron2 is not installed; pip install 'git+https://github.com/facebookresearch/detectron2.git'",
              file=sys.stderr)
        return 2
    launch(_main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
