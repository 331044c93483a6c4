"""Command line: ``python -m bench <command>``. Every user error is one line on stderr and exit code 2."""

from __future__ import annotations

import os
import sys

from bench.errors import BenchError
from bench.names import check_experiment, check_id, check_output_file
from bench.cli_parser import _components, build_parser


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
    put("run", "recipe", getattr(args, "recipe", None))
    put("run", "storage", args.storage)
    put("run", "address", args.address)
    if args.no_baseline:
        put("run", "baseline", False)
    if getattr(args, "no_cache", False):
        put("run", "cache", False)
    put("backbone", "name", args.backbone)
    put("backbone", "init", args.init)
    put("pretrain", "workers", args.workers)
    put("pretrain", "gpu", args.gpu)
    put("pretrain", "epochs", args.epochs)
    put("tracking", "uri", args.tracking_uri)
    put("tracking", "experiment", args.experiment)
    return flags


def _resolve_init(cfg, load: bool = False) -> None:
    """``--init`` must exist (and, with ``load``, load into the backbone: errors name the path as given); it then
    becomes absolute, because Ray workers do not share the driver's working directory."""
    if cfg.backbone.init:
        if not os.path.isfile(cfg.backbone.init):
            raise BenchError(f"--init {cfg.backbone.init}: file not found")
        if load:
            from bench.backbones import create_backbone

            create_backbone(cfg.backbone.name, cfg.backbone.init)  # fail early on a bad checkpoint
        cfg.backbone.init = os.path.abspath(cfg.backbone.init)


def cmd_run(args) -> int:
    from bench.config import load_config
    from bench.pipeline import run

    from bench import recipe_tools

    cfg = load_config(args.config, args.sets, _run_flags(args))
    if args.print_config:
        print(recipe_tools.print_config(cfg), end="")
        return 0
    _resolve_init(cfg, load=True)
    recipe_tools.require_init(cfg)
    warn = recipe_tools.warning_line(cfg)
    if warn:
        print(warn, file=sys.stderr)
    for method in cfg.run.methods:
        if recipe_tools.needs_estimate(cfg, method):
            print(recipe_tools.estimate_line(cfg, method), file=sys.stderr)
    if args.seeds:
        from bench.pipeline import parse_seeds

        cfg.run.seeds = parse_seeds(args.seeds, cfg.run.seed)
    if args.from_tune:
        from rich.console import Console

        from bench.tune import apply_from_tune

        names = [check_id(n.strip(), "--from-tune", "search name") for n in args.from_tune.split(",") if n.strip()]
        if not names:
            raise BenchError("--from-tune: expected the name of a `bench tune` search")
        cfg = apply_from_tune(cfg, names, Console())
    run(cfg, progress=not args.no_progress)
    return 0


def cmd_leaderboard(args) -> int:
    from bench.leaderboard import export, render, rows_from_mlflow
    from bench.tracking import Tracker

    if args.run_id:
        check_id(args.run_id, "--run-id")
    check_experiment(args.experiment or "bench")
    tracker = Tracker(args.tracking_uri or "", args.experiment or "bench", create=False)
    rows = rows_from_mlflow(tracker, args.run_id)
    if not rows:
        raise BenchError(f"no finished evaluations in experiment '{tracker.experiment}' ({tracker.uri})")
    title = f"Leaderboard · run {args.run_id}" if args.run_id else f"Leaderboard · experiment '{tracker.experiment}'"
    if args.with_reference or args.reference:
        from bench import reference

        refs = reference.load(args.reference)
        reference.mark_comparability(rows)
        matched = reference.matching_rows(rows, refs)
        if not any(reference.comparable(r) for r in rows):
            print("no row ran a `paper` recipe unchanged: published numbers are shown only beside those "
                  "(`python -m bench run --recipe paper ...`); the rows below are marked not comparable")
        elif not matched:
            print(f"no reference row matches these results' dataset and protocol; {len(refs)} published rows "
                  f"cover {', '.join(reference.coverage(refs))}")
        rows = rows + matched
    from bench.leaderboard import build

    rows = build(rows, per_protocol=not args.run_id)
    render(rows, title=title)
    if args.export:
        paths = export(rows, args.results_dir, args.run_id or f"leaderboard-{tracker.experiment}")
        print("wrote " + ", ".join(paths))
    return 0


def cmd_ui(args) -> int:
    from bench.ui import serve

    return serve(args.tracking_uri, args.experiment or "bench", args.port, args.host, not args.no_browser,
                 args.screenshot)


def cmd_data(args) -> int:
    from bench.datacheck import cmd_data as data_command

    return data_command(args)


def cmd_recipe(args) -> int:
    from bench import plugins, recipe_tools
    from bench.registry import METHODS

    plugins.load_all()
    if args.action == "list":
        print(recipe_tools.list_all())
        return 0
    METHODS.validate([args.method], "method")
    print(recipe_tools.show(args.method, args.recipe) if args.action == "show"
          else recipe_tools.diff(args.method, args.a, args.b))
    return 0


COMMANDS = {"run": cmd_run, "leaderboard": cmd_leaderboard, "data": cmd_data, "ui": cmd_ui, "recipe": cmd_recipe}


def cmd_submit(args) -> int:
    from bench import submit

    if args.status:
        print(submit.job_status(args.address, args.status))
        return 0
    if args.logs:
        print(submit.job_logs(args.address, args.logs), end="")
        return 0
    if args.stop:
        print(submit.job_stop(args.address, args.stop))
        return 0
    command = list(args.bench_command[1:]) if args.bench_command[:1] == ["--"] else list(args.bench_command)
    job_id = submit.submit(args.address, command, pip=args.pip, follow=not args.no_follow)
    if args.no_follow:
        print(job_id)
    return 0


COMMANDS["submit"] = cmd_submit


def cmd_reproduce(args) -> int:
    from bench.reproduce import reproduce

    reproduce(args.mlflow_run_id, args.tracking_uri or "", args.experiment or "bench", storage=args.storage or "",
              progress=not args.no_progress)
    return 0


COMMANDS["reproduce"] = cmd_reproduce


def cmd_export(args) -> int:
    from bench.config import load_config
    from bench.export import FORMATS, export
    from bench.registry import METHODS

    check_id(args.run, "--run")
    check_output_file(args.output, "-o")
    if args.format not in FORMATS:
        raise BenchError(f"--format {args.format}: unknown; valid: {', '.join(FORMATS)}")
    if args.method != "random-init":
        METHODS.validate([args.method], "--method")
    flags = {"run": {"methods": [args.method]}} if args.method != "random-init" else {}
    if args.backbone:
        flags.setdefault("backbone", {})["name"] = args.backbone
    cfg = load_config(args.config, args.sets, flags)
    for path in export(args.format, args.storage, args.run, args.method, args.output, args.backbone, cfg, args.gpus):
        print(f"wrote {path}")
    return 0


COMMANDS["export"] = cmd_export



def cmd_tune(args) -> int:
    from bench.config import RunSection, load_config
    from bench.tune import TuneOptions, new_search, resume_search

    if args.resume:
        check_id(args.resume, "--resume", "search name")
        given = [opt for opt, v in (("--method", args.method), ("--task", args.task), ("--trials", args.trials),
                                    ("--space", args.space), ("--space-only", args.space_only),
                                    ("--concurrent", args.concurrent), ("--name", args.name),
                                    ("--reduction-factor", args.reduction_factor), ("--no-asha", args.no_asha),
                                    ("--config", args.config), ("--set", args.sets), ("--data", args.data),
                                    ("--epochs", args.epochs), ("--workers", args.workers))
                 if v not in (None, False, [])]
        if given:
            raise BenchError(f"--resume {args.resume}: continues with the search's own settings; drop {', '.join(given)}")
        over: dict = {}
        if args.address is not None:
            over.setdefault("run", {})["address"] = args.address
        if args.tracking_uri is not None:
            over.setdefault("tracking", {})["uri"] = args.tracking_uri
        if args.experiment is not None:
            over.setdefault("tracking", {})["experiment"] = args.experiment
        try:
            out = resume_search(args.resume, args.storage or RunSection().storage, over)
        except KeyboardInterrupt:
            print(f"error: interrupted; continue with: python -m bench tune --resume {args.resume}", file=sys.stderr)
            return 130
    else:
        if not args.method:
            raise BenchError("--method: required, the method to tune (e.g. --method croc); or --resume NAME")
        if "," in args.method:
            raise BenchError(f"--method {args.method}: a search tunes one method; run one search per method")
        opts = TuneOptions(method=args.method.strip(), task=(args.task or "linseg").strip(),
                           trials=16 if args.trials is None else args.trials, space=list(args.space),
                           space_only=args.space_only, concurrent=args.concurrent or 0, name=args.name or "",
                           reduction_factor=args.reduction_factor or 2, asha=not args.no_asha)
        from bench.registry import METHODS, TASKS
        from bench.tune import check_options

        check_options(opts)
        METHODS.validate([opts.method], "--method")
        TASKS.validate([opts.task], "--task")
        flags: dict = {"run": {"methods": [opts.method], "tasks": [opts.task]}}
        for section, key, value in (("run", "data", args.data), ("run", "pretrain_data", args.pretrain_data),
                                    ("run", "eval_data", args.eval_data), ("run", "storage", args.storage),
                                    ("run", "address", args.address), ("backbone", "name", args.backbone),
                                    ("backbone", "init", args.init), ("run", "recipe", args.recipe),
                                    ("pretrain", "workers", args.workers),
                                    ("pretrain", "gpu", args.gpu), ("pretrain", "epochs", args.epochs),
                                    ("tracking", "uri", args.tracking_uri), ("tracking", "experiment", args.experiment)):
            if value is not None:
                flags.setdefault(section, {})[key] = value
        cfg = load_config(args.config, args.sets, flags)
        _resolve_init(cfg)
        from bench.recipe_tools import require_init

        require_init(cfg)
        try:
            out = new_search(cfg, opts)
        except KeyboardInterrupt:
            print(f"error: interrupted; continue with: python -m bench tune --resume {opts.name}", file=sys.stderr)
            return 130
    if out["interrupted"]:
        return 130
    return 0


COMMANDS["tune"] = cmd_tune

def cmd_perf(args) -> int:
    from bench.perf import run_perf
    from bench.registry import METHODS

    given = args.methods or ("" if args.gpu else "vice,clove,croc")
    methods = METHODS.validate([m.strip() for m in given.split(",") if m.strip()], "--methods")
    if args.gpu:
        from bench.perf.gpu import run_gpu

        run_gpu(methods or sorted(METHODS.names()), args.out, args.peak_tflops)
        return 0
    run_perf([o.strip() for o in args.only.split(",") if o.strip()], methods, args.out, tiny=args.tiny,
             steps=args.steps, profile=args.profile)
    return 0


COMMANDS["perf"] = cmd_perf

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
        print(f"error: {' '.join(ln.strip() for ln in str(exc).splitlines() if ln.strip())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; re-run the same command with --run-id <id> to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the safety net: one line, the traceback on request
        if os.environ.get("BENCH_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: bench {args.command}: unexpected {type(exc).__name__}: {_one_line(exc)} (a bug or an input "
              f"bench does not check yet; rerun with BENCH_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, at most 300 characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]
