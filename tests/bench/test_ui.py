"""``bench ui``: store and port checks (fast), and the real MLflow UI in headless Chromium (slow)."""

import io
import os
import socket
import sqlite3

import numpy as np
import pytest

from bench import ui
from bench.cli import main
from bench.errors import BenchError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow store with the bench experiment and two ``bench run`` parent runs (no Ray, no training)."""
    import time

    from bench.tracking import Tracker

    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    tracker = Tracker(uri, "bench")
    first = tracker.start_run("run-a", {"bench.kind": "run", "bench.run_id": "a"})
    time.sleep(0.01)
    second = tracker.start_run("run-b", {"bench.kind": "run", "bench.run_id": "b"})
    tracker.start_run("eval", {"bench.kind": "eval"}, parent=second)
    return {"uri": uri, "path": str(folder / "mlruns.db"), "runs": (first, second), "exp": tracker.experiment_id}


def test_missing_store_is_one_clear_line(tmp_path):
    with pytest.raises(BenchError) as exc:
        ui.check_store(str(tmp_path / "nothing.db"))
    assert "no MLflow store at" in _one_line(exc) and "nothing.db" in str(exc.value)
    with pytest.raises(BenchError) as exc:
        ui.check_store(f"sqlite:///{tmp_path}")  # a folder, not a database
    assert "is not a file" in _one_line(exc)
    with pytest.raises(BenchError) as exc:
        ui.check_store(f"file://{tmp_path / 'mlruns'}")
    assert "no MLflow file store" in _one_line(exc)


def test_corrupt_or_foreign_store_is_refused_and_left_untouched(tmp_path):
    garbage = tmp_path / "mlruns.db"
    garbage.write_bytes(os.urandom(4096))
    before = garbage.read_bytes()
    with pytest.raises(BenchError) as exc:
        ui.check_store(str(garbage))
    assert "not a readable SQLite database" in _one_line(exc) and "corrupt" in str(exc.value)
    assert garbage.read_bytes() == before

    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes (x TEXT)")
    con.commit()
    con.close()
    with pytest.raises(BenchError) as exc:
        ui.check_store(f"sqlite:///{other}")
    assert "not an MLflow store" in _one_line(exc) and "experiments" in str(exc.value)
    con = sqlite3.connect(other)  # mlflow's migrations never ran on it
    assert {r[0] for r in con.execute("SELECT name FROM sqlite_master")} == {"notes"}
    con.close()


def test_server_uri_is_refused():
    with pytest.raises(BenchError) as exc:
        ui.check_store("http://mlflow.example:5000")
    assert "already a tracking server" in _one_line(exc)


def test_port_in_use_and_bad_ports():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(BenchError) as exc:
            ui.check_port("127.0.0.1", port)
        assert _one_line(exc).startswith(f"--port {port}: cannot listen on 127.0.0.1:{port}")
    ui.check_port("127.0.0.1", port)  # free again once the listener is gone
    for bad in (0, 70000):
        with pytest.raises(BenchError, match="expected a TCP port 1..65535"):
            ui.check_port("127.0.0.1", bad)


def test_cli_errors_exit_2_with_one_line(tmp_path, store, capsys):
    assert main(["ui", "--tracking-uri", str(tmp_path / "none.db"), "--no-browser"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tracking-uri") and "no MLflow store" in err and "\n" not in err

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["ui", "--tracking-uri", store["uri"], "--port", str(port), "--no-browser"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --port {port}") and "\n" not in err

    assert main(["ui", "--tracking-uri", store["uri"], "--experiment", "nope", "--port", str(_free_port()),
                 "--no-browser"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --experiment nope: no such experiment in {store['uri']}"


def test_screenshot_without_chromium_says_how_to_install(store, monkeypatch):
    monkeypatch.setattr(ui, "find_chromium", lambda: None)
    with pytest.raises(BenchError) as exc:
        ui.serve(store["uri"], port=_free_port(), screenshot_path="x.png", out=io.StringIO())
    assert "apt-get install chromium" in _one_line(exc)


def test_locate_finds_the_newest_bench_run_and_urls(store):
    exp, run = ui.locate(store["uri"], "bench")
    assert exp == store["exp"] and run == store["runs"][1]
    links = ui.urls("0.0.0.0", 5123, exp, run)
    assert links["base"] == "http://127.0.0.1:5123"
    assert links["experiment"] == (f"http://127.0.0.1:5123/#/experiments/{exp}/runs"
                                   f"?workflowType=machine_learning&compareRunsMode=ARTIFACT")
    assert links["leaderboard"] == (f"http://127.0.0.1:5123/#/experiments/{exp}/runs/{run}"
                                    f"/artifacts/leaderboard.json?workflowType=machine_learning")
    assert "leaderboard" not in ui.urls("127.0.0.1", 1, exp, None)


def test_page_text_strips_scripts_and_tags():
    html = "<html><script>var x='hidden'</script><style>.a{}</style><div>run&nbsp;<b>eval-dino</b></div></html>"
    assert ui.page_text(html) == "run eval-dino"


# ------------------------------------------------------------------------------------------------ slow
CHROMIUM = ui.find_chromium()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason=f"no Chromium for the browser test: {ui.CHROMIUM_INSTALL}")
def test_ui_shows_runs_leaderboard_and_metrics_in_a_real_browser(tmp_path, monkeypatch):
    """A tiny ``bench run``, then ``bench ui`` on its store, loaded in headless Chromium."""
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from tests.support import tiny_argv

    monkeypatch.chdir(tmp_path)
    try:
        assert main(["run", "--methods", "dino", "--tasks", "linseg", "--run-id", "uitest", "--no-progress"]
                    + tiny_argv()) == 0
    finally:
        import ray

        ray.shutdown()
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"

    # what `bench run` logged for the UI: figures, alias metric, tags that MLflow search can use
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench").experiment_id
    evals = {r.data.tags["method"]: r for r in client.search_runs([exp], "tags.`bench.kind` = 'eval'")}
    assert set(evals) == {"dino", "random-init"}
    for run in evals.values():
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert arts == {"figures/features_pca.png", "figures/linseg_predictions.png"}
        assert run.data.metrics["linseg_miou"] == run.data.metrics["linseg/miou"]
        for tag in ("method", "task", "dataset", "backbone", "git_commit", "config_hash", "mlflow.source.git.commit"):
            assert run.data.tags.get(tag), tag
    found = client.search_runs([exp], "metrics.linseg_miou >= 0 and tags.task = 'linseg'")
    assert {r.info.run_id for r in found} == {r.info.run_id for r in evals.values()}
    parent = client.search_runs([exp], "tags.`bench.kind` = 'run'")[0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "leaderboard.json", "leaderboard.md", "features_pca.png"}

    port = _free_port()
    with ui.UIServer(ui.check_store(uri), "127.0.0.1", port).start():
        exp_id, run_id = ui.locate(uri, "bench")
        links = ui.urls("127.0.0.1", port, exp_id, run_id)

        board = ui.page_text(ui.dump_dom(links["experiment"]))  # runs page, leaderboard tables compared
        assert "uitest" in board and "leaderboard.json" in board and "linseg/miou" in board
        assert "dino" in board and "random-init" in board

        overview = ui.page_text(ui.dump_dom(links["run"]))  # the bench run: metrics and child runs
        for text in ("dino/linseg/miou", "random-init/linseg/miou", "eval-dino-linseg", "eval-random-init-linseg",
                     "pretrain-dino"):
            assert text in overview, text

        eval_page = ui.page_text(ui.dump_dom(
            f"{links['base']}/#/experiments/{exp_id}/runs/{evals['dino'].info.run_id}/artifacts?"
            f"workflowType=machine_learning"))
        for text in ("figures", "linseg_per_class.json"):
            assert text in eval_page, text
        eval_overview = ui.page_text(ui.dump_dom(
            f"{links['base']}/#/experiments/{exp_id}/runs/{evals['dino'].info.run_id}?workflowType=machine_learning"))
        for text in ("linseg/miou", "linseg/pixel_acc", "linseg_miou", "eval-dino-linseg"):
            assert text in eval_overview, text

        table = ui.page_text(ui.dump_dom(links["leaderboard"]))
        assert "leaderboard.json" in table and "linseg/pixel_acc" in table and "vit_tiny_d4_p8" in table

        shot = ui.screenshot(links["leaderboard"], str(tmp_path / "ui.png"))
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (900, 1800) and img.std() > 10  # a rendered page, not a blank one
