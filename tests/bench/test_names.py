"""Names that become paths (bench.names): run ids, search names, experiment names, output files."""

import os

import pytest

from bench import names
from bench.cli import main
from bench.config import load_config
from bench.errors import BenchError

BAD_IDS = ["../../escape", "..", ".", "a/b", "/abs", "a b", "x\x00y", "", "ü", "a" * 129, "run;rm"]
GOOD_IDS = ["20250101-120000", "dino.v2", "A_b-c.9", "a" * 128, ".hidden"]


def test_case_lists_are_not_empty():
    assert BAD_IDS and GOOD_IDS


@pytest.mark.parametrize("value", BAD_IDS)
def test_bad_run_ids_are_refused_in_one_line(value):
    with pytest.raises(BenchError) as exc:
        names.check_id(value, "--run-id")
    assert str(exc.value).startswith("--run-id") and "\n" not in str(exc.value)


@pytest.mark.parametrize("value", GOOD_IDS)
def test_good_run_ids_pass_and_stay_inside_storage(tmp_path, value):
    assert names.check_id(value, "--run-id") == value
    path = names.inside(str(tmp_path), value, "--run-id")
    assert os.path.dirname(path) == str(tmp_path)


def test_config_resolution_refuses_an_escaping_run_id_and_a_path_like_experiment(tmp_path):
    with pytest.raises(BenchError, match=r"^--run-id \.\./\.\./escape: a run id uses letters"):
        load_config(None, [], {"run": {"run_id": "../../escape"}})
    with pytest.raises(BenchError, match=r"^--run-id"):
        load_config(None, ["run.run_id=a/b"])  # --set and YAML go through the same check
    with pytest.raises(BenchError, match=r"^--experiment '\.\./x'"):
        load_config(None, ["tracking.experiment=../x"])
    assert load_config(None, ["tracking.experiment=my experiment (v2)"]).tracking.experiment == "my experiment (v2)"


def test_cli_run_with_escaping_run_id_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = tmp_path / "a" / "b" / "storage"
    assert main(["run", "--run-id", "../../escape", "--storage", str(storage)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --run-id ../../escape:") and "\n" not in err
    assert not (tmp_path / "a" / "escape").exists() and not storage.exists()


def test_cli_names_of_tune_export_and_leaderboard(tmp_path, capsys):
    cases = [(["tune", "--resume", "../x"], "error: --resume ../x: a search name"),
             (["run", "--from-tune", "../../x"], "error: --from-tune ../../x: a search name"),
             (["export", "--format", "detectron2", "--run", "../r", "--method", "dino", "-o", "m.pkl"],
              "error: --run ../r: a run id"),
             (["export", "--format", "detectron2", "--run", "r", "--method", "dino", "-o", str(tmp_path)],
              f"error: -o {tmp_path}: is a folder"),
             (["leaderboard", "--run-id", "a/../../b", "--export"], "error: --run-id a/../../b"),
             (["leaderboard", "--experiment", "../../etc", "--export"], "error: --experiment '../../etc'")]
    assert cases
    for argv, start in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith(start) and "\n" not in err, (argv, err)


def test_output_file_checks(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BenchError, match="is a file, so"):
        names.check_output_file(str(f / "sub" / "m.pkl"), "-o")
    assert names.check_output_file(str(tmp_path / "new" / "m.pkl"), "-o")  # a folder the exporter may create
    with pytest.raises(BenchError, match="expected a file path"):
        names.check_output_file("", "-o")
