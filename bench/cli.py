"""Command line: ``python -m bench <command>``. Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys

from bench.errors import BenchError

CONFIG_HELP = """\
configuration (lowest to highest precedence):
  1. defaults: dataclasses per section (run, backbone, pretrain, tracking) and per registered
     method / task / dataset (methods.<name>, tasks.<name>, data.<name>)
  2. --config FILE.yaml with the same nesting, e.g.
       pretrain: {epochs: 3, batch_size: 32}
       methods: {dino: {teacher_temp: 0.05}}
  3. --set key.path=value (repeatable), e.g. --set methods.dino.teacher_temp=0.05 --set pretrain.epochs=3
  4. the flags above (--methods, --workers, --gpu, --init, ...)
  unknown keys and wrong types are rejected with the key and the expected type.
"""


def _components() -> str:
    from bench import plugins
    from bench.registry import BACKBONES, DATASETS, METHODS, TASKS

    plugins.load_all()
    return (f"registered: methods {', '.join(METHODS.names())}; tasks {', '.join(TASKS.names())}; "
            f"datasets {', '.join(DATASETS.names())}; backbones {', '.join(BACKBONES.names())}")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///./mlruns.db)")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default 'bench')")


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="dotted override, repeatable (e.g. pretrain.epochs=3)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="Benchmark harness for dense self-supervised learning.")
    sub = parser.add_subparsers(dest="command", metavar="command")

    run = sub.add_parser("run", help="pretrain methods, evaluate tasks, print the leaderboard",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CONFIG_HELP)
    run.add_argument("--methods", help="comma-separated method names (default dino)")
    run.add_argument("--tasks", help="comma-separated task names (default linseg)")
    run.add_argument("--data", help="dataset for pretraining and evaluation (default synthetic)")
    run.add_argument("--pretrain-data", help="dataset for pretraining only")
    run.add_argument("--eval-data", help="dataset for evaluation only")
    run.add_argument("--backbone", help="backbone name (default vit_tiny_d4_p8)")
    run.add_argument("--init", help="local checkpoint to initialise the backbone from (weights_only load)")
    run.add_argument("--workers", type=int, help="Ray Train workers for pretraining (default 1)")
    run.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker, bf16 autocast")
    run.add_argument("--epochs", type=int, help="pretraining epochs (same as --set pretrain.epochs=N)")
    run.add_argument("--run-id", help="run id; re-running with the same id resumes and skips finished stages")
    run.add_argument("--storage", help="folder for checkpoints and run state (default ./bench_runs)")
    run.add_argument("--address", help="Ray address; empty starts a local Ray, 'auto' joins a running cluster")
    run.add_argument("--no-baseline", action="store_true", help="skip the random-init baseline row")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")
    _add_config(run)
    _add_common(run)

    lb = sub.add_parser("leaderboard", help="reprint a leaderboard from MLflow")
    lb.add_argument("--run-id", help="one bench run (default: best per method x task over the experiment)")
    lb.add_argument("--export", action="store_true", help="also write results/<name>.md and .csv")
    lb.add_argument("--results-dir", default="results")
    _add_common(lb)
    return parser


def _run_flags(args) -> dict:
    flags: dict = {}

    def put(section: str, key: str, value) -> None:
        if value is not None:
            flags.setdefault(section, {})[key] = value

    def names(value: str | None, option: str):
        if value is None:
            return None
        items = [v.strip() for v in value.split(",") if v.strip()]
        if not items:
            raise BenchError(f"{option}: expected a comma-separated list of names")
        return items

    put("run", "methods", names(args.methods, "--methods"))
    put("run", "tasks", names(args.tasks, "--tasks"))
    put("run", "data", args.data)
    put("run", "pretrain_data", args.pretrain_data)
    put("run", "eval_data", args.eval_data)
    put("run", "run_id", args.run_id)
    put("run", "storage", args.storage)
    put("run", "address", args.address)
    if args.no_baseline:
        put("run", "baseline", False)
    put("backbone", "name", args.backbone)
    put("backbone", "init", args.init)
    put("pretrain", "workers", args.workers)
    put("pretrain", "gpu", args.gpu)
    put("pretrain", "epochs", args.epochs)
    put("tracking", "uri", args.tracking_uri)
    put("tracking", "experiment", args.experiment)
    return flags


def cmd_run(args) -> int:
    from bench.config import load_config
    from bench.pipeline import run

    cfg = load_config(args.config, args.sets, _run_flags(args))
    if cfg.backbone.init and not os.path.isfile(cfg.backbone.init):
        raise BenchError(f"--init {cfg.backbone.init}: file not found")
    if cfg.pretrain.workers < 1:
        raise BenchError(f"--workers {cfg.pretrain.workers}: expected at least 1")
    if cfg.backbone.init:
        from bench.backbones import create_backbone

        create_backbone(cfg.backbone.name, cfg.backbone.init)  # fail early on a bad checkpoint
    run(cfg, progress=not args.no_progress)
    return 0


def cmd_leaderboard(args) -> int:
    from bench.leaderboard import export, render, rows_from_mlflow
    from bench.tracking import Tracker

    tracker = Tracker(args.tracking_uri or "", args.experiment or "bench", create=False)
    rows = rows_from_mlflow(tracker, args.run_id)
    if not rows:
        raise BenchError(f"no finished evaluations in experiment '{tracker.experiment}' ({tracker.uri})")
    title = f"Leaderboard · run {args.run_id}" if args.run_id else f"Leaderboard · best of experiment '{tracker.experiment}'"
    render(rows, title=title)
    if args.export:
        paths = export(rows, args.results_dir, args.run_id or f"leaderboard-{tracker.experiment}")
        print("wrote " + ", ".join(paths))
    return 0


COMMANDS = {"run": cmd_run, "leaderboard": cmd_leaderboard}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help") or not argv:
        parser.print_help()
        try:
            print("\n" + _components())
        except Exception:
            pass
        return 0
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command with --run-id <id> to resume", file=sys.stderr)
        return 130
