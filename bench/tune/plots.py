"""Optuna's view of a finished search: parameter importances and the optimisation-history and importance plots."""

from __future__ import annotations

from bench.tune.constants import OBJECTIVE

def optuna_summary(domains: dict, rows: list[dict], mode: str) -> dict:
    """Optuna's parameter importances (``param_importances.json``) and the optimisation-history and importance
    plots (PNG bytes) from the finished trials; a note (``notes.txt``) where there is too little to say."""
    import io
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    out: dict = {}
    try:
        dists = OptunaSearch.convert_search_space(dict(domains))
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        for r in rows:
            params = {k: r[k] for k in dists if r.get(k) is not None}
            if len(params) != len(dists):
                continue
            if r["status"] == "completed":
                study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=r[OBJECTIVE]))
            elif r["status"] == "early_stopped":
                study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                          state=optuna.trial.TrialState.PRUNED))
    except Exception as exc:  # noqa: BLE001 - a summary must not fail the search
        return {"notes.txt": f"no Optuna summary: {type(exc).__name__}: {exc}"}

    def png(ax) -> bytes:
        fig = ax.figure if hasattr(ax, "figure") else ax
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        return buf.getvalue()

    notes = []
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if complete:
            out["optimization_history.png"] = png(optuna.visualization.matplotlib.plot_optimization_history(study))
        else:
            notes.append("no completed trial: no optimisation history")
        if len(complete) >= 2:
            try:
                imp = optuna.importance.get_param_importances(study)
                out["param_importances.json"] = {k: float(v) for k, v in imp.items()}
                out["param_importances.png"] = png(optuna.visualization.matplotlib.plot_param_importances(study))
            except Exception as exc:  # noqa: BLE001 - e.g. every completed trial has the same values
                notes.append(f"no parameter importances: {type(exc).__name__}: {exc}")
        else:
            notes.append(f"parameter importances need at least 2 completed trials ({len(complete)} completed)")
    if notes:
        out["notes.txt"] = "\n".join(notes)
    return out

