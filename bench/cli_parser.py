"""The argument parser of ``python -m bench``: every subcommand, its options and the config precedence help.

Kept apart from ``bench.cli`` (which runs the commands) so each stays one job and one screenful.
"""

from __future__ import annotations

import argparse

CONFIG_HELP = """\
configuration (lowest to highest precedence):
  1. defaults: dataclasses per section (run, backbone, pretrain, tracking) and per registered
     method / task / dataset (methods.<name>, tasks.<name>, data.<name>); on a real dataset the tasks
     take that dataset's published protocol preset
  1b. the recipe (--recipe NAME|FILE, run.recipe; default cpu on synthetic data, paper otherwise):
     methods/recipes/<method>.yaml, see `python -m bench recipe list`
  2. --config FILE.yaml with the same nesting, e.g.
       pretrain: {epochs: 3, batch_size: 32}
       methods: {dino: {teacher_temp: 0.05}}
  3. --set key.path=value (repeatable), e.g. --set methods.dino.teacher_temp=0.05 --set pretrain.epochs=3
  4. the flags above (--methods, --workers, --gpu, --init, ...)
  unknown keys and wrong types are rejected with the key and the expected type.
"""

TUNE_HELP = """\
examples:
  python -m bench tune --method croc --task linseg --trials 16
  python -m bench tune --method croc --space "croc.lambda_pos=loguniform(0.1,10)" --space space.yaml
  python -m bench tune --resume croc-linseg-20250101-120000     (continue an interrupted search)
  python -m bench run --methods croc --from-tune croc-linseg-20250101-120000
the objective is the task's primary metric after full pretraining; ASHA stops weak trials on a held-out proxy
score reported every pretrain.proxy_every steps (default: a quarter of the pretraining). Results: MLflow (a
parent run with nested trial runs) and <storage>/tune/<name>/ (trials.csv, best.json).
"""


def _components() -> str:
    from bench.registry import BACKBONES, DATASETS, METHODS, TASKS

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
    run.add_argument("--init", help="local checkpoint to initialise the backbone from (weights_only load); a bench "
                     "final.pt gives that method's evaluation backbone")
    run.add_argument("--workers", type=int, help="Ray Train workers for pretraining (default 1)")
    run.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker, bf16 autocast")
    run.add_argument("--epochs", type=int, help="pretraining epochs (same as --set pretrain.epochs=N)")
    run.add_argument("--run-id", help="run id; re-running with the same id resumes and skips finished stages")
    run.add_argument("--storage", help="folder for checkpoints and run state (default ./bench_runs)")
    run.add_argument("--address", help="Ray address; empty starts a local Ray, 'auto' joins a running cluster")
    run.add_argument("--no-baseline", action="store_true", help="skip the random-init baseline row")
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")
    run.add_argument("--recipe", help="paper | cpu | a named variant | FILE.yaml[:NAME] (comma list: files per method "
                                      "+ one name); default cpu on synthetic data, paper otherwise")
    run.add_argument("--print-config", action="store_true",
                     help="print the fully resolved configuration (YAML keyed like --set paths) and exit")
    run.add_argument("--seeds", metavar="N|S1,S2,..",
                     help="pretrain each method once per seed (N seeds from run.seed, or a list); cells show mean ± std")
    run.add_argument("--no-cache", action="store_true",
                     help="recompute pretrainings and evaluations an earlier run already finished with the same key")
    run.add_argument("--from-tune", metavar="NAME[,NAME]",
                     help="pretrain with the best config of `bench tune` search(es) NAME for the method(s) they tuned "
                          "(default --methods: those methods; explicit --set/--config values still win)")
    _add_config(run)
    _add_common(run)

    tn = sub.add_parser("tune", help="hyperparameter search: Ray Tune + Optuna TPE + ASHA over a method's search space",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TUNE_HELP + "\n" + CONFIG_HELP)
    tn.add_argument("--method", help="the method to tune (one registered method)")
    tn.add_argument("--task", default=None, help="the task whose primary metric is the objective (default linseg)")
    tn.add_argument("--trials", type=int, default=None, help="number of trials (default 16)")
    tn.add_argument("--space", action="append", default=[], metavar="KEY=DIST|FILE.yaml",
                    help="replace or add a distribution, repeatable: croc.lambda_pos=loguniform(0.1,10), "
                         "pretrain.lr=loguniform(1e-4,1e-3), croc.n_tokens=choice(4,6,8), croc.teacher_temp=0.05 (fixed)")
    tn.add_argument("--space-only", action="store_true", help="search only the --space entries, not the method's defaults")
    tn.add_argument("--concurrent", type=int, default=None, help="trials at once (default: as many as the cluster holds)")
    tn.add_argument("--name", help="search name (default <method>-<task>-<time>); its folder is <storage>/tune/<name>")
    tn.add_argument("--resume", metavar="NAME", help="continue an interrupted search with its own settings")
    tn.add_argument("--reduction-factor", type=int, default=None, help="ASHA reduction factor (default 2)")
    tn.add_argument("--no-asha", action="store_true", help="no early stopping: every trial runs to the end")
    tn.add_argument("--data", help="dataset for pretraining and evaluation (default synthetic)")
    tn.add_argument("--pretrain-data", help="dataset for pretraining only")
    tn.add_argument("--eval-data", help="dataset for evaluation only")
    tn.add_argument("--backbone", help="backbone name (default vit_tiny_d4_p8)")
    tn.add_argument("--init", help="local checkpoint to initialise the backbone from")
    tn.add_argument("--workers", type=int, help="Ray Train workers per trial (default 1)")
    tn.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    tn.add_argument("--epochs", type=int, help="pretraining epochs per trial")
    tn.add_argument("--recipe", help="the recipe the search starts from (default cpu on synthetic data, paper otherwise)")
    tn.add_argument("--storage", help="folder for searches and checkpoints (default ./bench_runs)")
    tn.add_argument("--address", help="Ray address; empty starts a local Ray, 'auto' joins a running cluster")
    _add_config(tn)
    _add_common(tn)

    sb = sub.add_parser("submit", help="run a bench command on a Ray cluster as a Ray Job",
                        description="bench submit --address http://HEAD:8265 -- run --methods vice,clove,croc")
    sb.add_argument("--address", required=True, help="Ray Jobs address (http://HEAD:8265) or 'auto' inside a cluster")
    sb.add_argument("--pip", action="store_true", help="install the project's requirements in the job's runtime_env")
    sb.add_argument("--no-follow", action="store_true", help="return after submitting instead of streaming logs")
    sb.add_argument("--status", metavar="JOB_ID", help="print a job's status")
    sb.add_argument("--logs", metavar="JOB_ID", help="print a job's logs")
    sb.add_argument("--stop", metavar="JOB_ID", help="stop a job")
    sb.add_argument("bench_command", nargs=argparse.REMAINDER, metavar="command",
                    help="-- then the bench command to run")

    pf = sub.add_parser("perf", help="benchmarks of the hot paths; writes results/perf.json and .md")
    pf.add_argument("--only", default="sinkhorn,kmeans,ray,data,headline,tune,cost,scaling,loader",
                    help="comma-separated: sinkhorn, kmeans, ray, data, headline, tune, cost, scaling, loader")
    pf.add_argument("--profile", action="store_true", help="headline: add per-op profiles of steps and evaluation")
    pf.add_argument("--gpu", action="store_true", help="the GPU suite instead (paper-scale bf16 steps, MFU, views, "
                                                       "linseg extraction) -> <out>-gpu.md")
    pf.add_argument("--peak-tflops", type=float, default=0.0, help="--gpu: the device's dense bf16 peak for MFU "
                                                                   "(default: from the device name)")
    pf.add_argument("--methods", default=None, help="methods for ray/data/headline/tune/cost/scaling (default "
                                                    "vice,clove,croc; with --gpu every method)")
    pf.add_argument("--steps", type=int, default=30, help="pretraining steps for the ray and tune benchmarks")
    pf.add_argument("--out", default="results/perf", help="output prefix (.json and .md are written)")
    pf.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke test, not a measurement)")

    lb = sub.add_parser("leaderboard", help="reprint a leaderboard from MLflow")
    lb.add_argument("--run-id", help="one bench run (default: the whole experiment, one table per evaluation "
                    "dataset and task protocol, rows aggregated over seeds of the same key)")
    lb.add_argument("--export", action="store_true", help="also write results/<name>.md and .csv")
    lb.add_argument("--results-dir", default="results")
    lb.add_argument("--with-reference", action="store_true",
                    help="add the published numbers of results/reference.yaml where dataset and protocol match")
    lb.add_argument("--reference", default=None, metavar="FILE.yaml",
                    help="reference file (default results/reference.yaml; implies --with-reference)")
    _add_common(lb)

    rp = sub.add_parser("reproduce", help="re-run one leaderboard cell from its MLflow evaluation run and print "
                                          "the difference to the recorded value")
    rp.add_argument("mlflow_run_id", help="the MLflow run id of an evaluation (a leaderboard cell)")
    rp.add_argument("--storage", help="folder for the re-run's checkpoints (default: the recorded run.storage)")
    rp.add_argument("--no-progress", action="store_true", help="no live progress bar")
    _add_common(rp)

    ui = sub.add_parser("ui", help="start the MLflow UI on the tracking store, opened on the leaderboards")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, this machine only)")
    ui.add_argument("--no-browser", action="store_true", help="only print the address")
    ui.add_argument("--screenshot", metavar="FILE.png",
                    help="save the newest leaderboard page (headless Chromium) and exit")
    _add_common(ui)

    data = sub.add_parser("data", help="inspect a dataset: `data check --data NAME` (counts, class histogram)")
    data_sub = data.add_subparsers(dest="action", metavar="action", required=True)
    chk = data_sub.add_parser("check", help="build a dataset's splits; print image counts and the class histogram",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CONFIG_HELP)
    chk.add_argument("--data", required=True, help="dataset name, e.g. cityscapes27 (its root: --set data.NAME.root=...)")
    chk.add_argument("--split", default="val", help="split for the class histogram (default val)")
    chk.add_argument("--max-images", type=int, default=500, help="images for the histogram, picked evenly (0 = all)")
    _add_config(chk)

    ex = sub.add_parser("export", help="convert a trained backbone for another framework (detectron2 weights pickle, "
                                       "configs and launch scripts)")
    ex.add_argument("--format", required=True, help="detectron2")
    ex.add_argument("--run", required=True, help="run id: the folder <storage>/<run> of a bench run")
    ex.add_argument("--method", required=True, help="method whose evaluation backbone to export (or random-init)")
    ex.add_argument("-o", "--output", required=True, help="output weights file, e.g. model.pkl")
    ex.add_argument("--storage", default="bench_runs", help="the run's storage folder (default ./bench_runs)")
    ex.add_argument("--backbone", help="backbone of the run (default: inferred from the checkpoint)")
    ex.add_argument("--gpus", type=int, default=8, help="GPUs in the written launch scripts (default 8)")
    _add_config(ex)

    rc = sub.add_parser("recipe", help="methods' published (paper), CPU and variant configurations: list | show | diff")
    rc_sub = rc.add_subparsers(dest="action", metavar="action", required=True)
    rc_sub.add_parser("list", help="every method's recipes")
    sh = rc_sub.add_parser("show", help="a method's recipe, every resolved value with its source")
    sh.add_argument("method")
    sh.add_argument("--recipe", default="paper", help="NAME or FILE.yaml[:NAME] (default paper)")
    df = rc_sub.add_parser("diff", help="what differs between two recipes of a method, with sources")
    df.add_argument("method")
    df.add_argument("a", help="recipe NAME or FILE.yaml[:NAME]")
    df.add_argument("b", help="recipe NAME or FILE.yaml[:NAME]")
    return parser
