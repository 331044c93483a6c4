"""``bench reproduce <mlflow-run-id>``: re-run one leaderboard cell from what its evaluation run recorded.

The evaluation run carries ``config.json`` (the user layer of the original command, the resolved config and
the seed), its method, task, seed and commit. The cell is pretrained (unless it is the untrained baseline)
and evaluated again in a fresh run folder with the cache off, then the recorded and the new value are printed
side by side. A checkout whose commit or code version differs from the recorded one is warned about: the
difference may then come from the code, not from the seed.
"""

from __future__ import annotations

import json
import os
import tempfile

from bench.errors import BenchError


def _recorded(tracker, run_id: str):
    try:
        run = tracker.client.get_run(run_id)
    except Exception:  # noqa: BLE001 - any lookup failure is "no such run here"
        raise BenchError(f"reproduce {run_id}: no such MLflow run in {tracker.uri}") from None
    tags = run.data.tags
    if tags.get("bench.kind") != "eval":
        raise BenchError(f"reproduce {run_id}: a {tags.get('bench.kind', 'non-bench')} run; give the run id of an "
                         f"evaluation (a leaderboard cell: `bench leaderboard` rows, MLflow runs named eval-...)")
    path = tracker.download(run_id, "config.json", tempfile.mkdtemp(prefix="bench-repro-"))
    if not path or not os.path.exists(path):
        raise BenchError(f"reproduce {run_id}: the run has no recorded config.json (logged by bench run since "
                         f"seeds and caching were added)")
    with open(path) as fh:
        return run, json.load(fh)


def reproduce(run_id: str, tracking_uri: str = "", experiment: str = "bench", console=None,
              storage: str = "", progress: bool = False) -> dict:
    """Re-run the cell of evaluation run ``run_id``; returns {recorded, reproduced, diff, metric, warnings}."""
    from rich.console import Console

    from bench.board import is_baseline
    from bench.cache import code_version
    from bench.config import deep_merge, resolve
    from bench.pipeline import Pipeline, new_run_id
    from bench.tracking import TAG, Tracker, git_commit

    console = console or Console()
    tracker = Tracker(tracking_uri, experiment, create=False)
    run, record = _recorded(tracker, run_id)
    tags = run.data.tags
    task, label, primary = tags[TAG["task"]], tags[TAG["method"]], tags[TAG["primary"]]
    seed = int(record.get("seed", tags.get(TAG["seed"], 0)))
    warnings = []
    if tags.get(TAG["git_commit"]) and tags[TAG["git_commit"]] != git_commit():
        warnings.append(f"recorded at commit {tags[TAG['git_commit']][:12]}, this checkout is {git_commit()[:12]}")
    code = code_version(("bench", "methods", "tasks"))
    if tags.get(TAG["code_version"]) and tags[TAG["code_version"]] != code:
        warnings.append(f"the method/task/bench code differs (code version {tags[TAG['code_version']]} recorded, "
                        f"{code} here)")
    for w in warnings:
        console.print(f"[yellow]warning: {w}[/yellow]")
    baseline = is_baseline(label)
    user = deep_merge(record.get("user") or {}, {"run": {
        "methods": [] if baseline else [label], "tasks": [task], "seed": seed, "seeds": [seed],
        "baseline": baseline, "cache": False, "run_id": f"reproduce-{run_id[:8]}-{new_run_id()}"}})
    if storage:
        user["run"]["storage"] = storage
    user.setdefault("tracking", {}).update({"uri": tracker.uri, "experiment": experiment})
    cfg = resolve(user)
    rows = Pipeline(cfg, console, progress=progress).run()
    row = next((r for r in rows if r.task == task and r.method == label), None)
    if row is None:
        raise BenchError(f"reproduce {run_id}: the re-run produced no {label} × {task} cell")
    recorded = run.data.metrics.get(f"{task}/{primary}")
    new = row.metrics.get(primary)
    diff = None if recorded is None or new is None else new - recorded
    console.print(f"reproduce {run_id}: {label} × {task} (seed {seed}) {primary}: recorded {recorded:.2f}, "
                  f"reproduced {new:.2f}, difference {diff:+.2f}" if diff is not None else
                  f"reproduce {run_id}: recorded {recorded}, reproduced {new}")
    return {"recorded": recorded, "reproduced": new, "diff": diff, "metric": f"{task}/{primary}",
            "warnings": warnings, "run_id": cfg.run.run_id}
