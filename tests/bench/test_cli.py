"""Bad input: one line on stderr, exit code 2, before any work starts."""

import pytest

from bench.cli import main


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv, message", [
    (["run", "--methods", "dino,nope"], r"--methods: unknown method 'nope'; valid: .*dino"),
    (["run", "--tasks", "segment"], r"--tasks: unknown task 'segment'; valid: .*linseg"),
    (["run", "--data", "imagenet"], r"--data: unknown dataset 'imagenet'; valid: .*synthetic"),
    (["run", "--set", "pretrain.epochs"], r"--set pretrain\.epochs: expected key\.path=value"),
    (["run", "--set", "pretrain.epochs=ten"], r"pretrain\.epochs: expected int, got str 'ten'"),
    (["run", "--init", "missing.pt"], r"--init missing\.pt: file not found"),
    (["run", "--config", "nope.yaml"], r"--config nope\.yaml: file not found"),
    (["run", "--methods", ","], r"--methods: expected a comma-separated list"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    import re

    code, err = _err(capsys, argv)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err


def test_wrong_type_in_yaml(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("methods:\n  dino:\n    teacher_temp: hot\n")
    code, err = _err(capsys, ["run", "--config", "c.yaml"])
    assert code == 2 and "methods.dino.teacher_temp: expected float, got str 'hot'" in err


def test_corrupted_init_checkpoint(capsys, tmp_path):
    (tmp_path / "w.pt").write_bytes(b"not a checkpoint")
    code, err = _err(capsys, ["run", "--init", "w.pt"])
    assert code == 2 and "--init w.pt: not a readable torch checkpoint" in err


def test_init_checkpoint_with_foreign_keys(capsys, tmp_path):
    import torch

    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "foreign.pt")
    code, err = _err(capsys, ["run", "--init", "foreign.pt"])
    assert code == 2 and "no tensor matches backbone 'vit_tiny_d4_p8'" in err


def test_init_checkpoint_loads_matching_weights(tmp_path):
    import torch

    from bench.backbones import create_backbone

    src = create_backbone("vit_tiny_d4_p8")
    torch.save({"model": {f"module.backbone.{k}": v for k, v in src.model.state_dict().items()}}, tmp_path / "ok.pt")
    dst = create_backbone("vit_tiny_d4_p8", init=str(tmp_path / "ok.pt"))
    for k, v in src.model.state_dict().items():
        assert torch.equal(dst.model.state_dict()[k], v)


def test_init_from_a_bench_checkpoint_takes_the_evaluation_backbone(tmp_path):
    """A DINO ``final.pt`` holds student and teacher; ``--init`` must load the teacher (DINO's evaluation
    backbone), not whichever backbone comes first."""
    import torch

    from bench.backbones import create_backbone
    from methods.build import build_method
    from bench.config import BackboneConfig
    from methods.base import Schedule

    torch.manual_seed(0)
    dino = build_method("dino", {}, BackboneConfig(), Schedule(2, 1, 2))
    with torch.no_grad():
        for p in dino.teacher.backbone.parameters():
            p.add_(1.0)  # teacher now differs from the student everywhere
    torch.save({"method": "dino", "step": 2, "method_state": dino.state_dict()}, tmp_path / "final.pt")
    dst = create_backbone("vit_tiny_d4_p8", init=str(tmp_path / "final.pt"))
    teacher = dino.teacher.backbone.model.state_dict()
    for k, v in dst.model.state_dict().items():
        assert torch.equal(v, teacher[k]), k
    # every method's checkpoint resolves to its evaluation backbone, and loading leaves the caller's RNG alone
    for name in ("vice", "leopart", "clove", "croc"):
        m = build_method(name, {}, BackboneConfig(), Schedule(2, 1, 2))
        torch.save({"method": name, "step": 2, "method_state": m.state_dict()}, tmp_path / f"{name}.pt")
        torch.manual_seed(5)
        dst = create_backbone("vit_tiny_d4_p8", init=str(tmp_path / f"{name}.pt"))
        after = torch.rand(1)
        torch.manual_seed(5)
        create_backbone("vit_tiny_d4_p8")
        assert torch.equal(after, torch.rand(1)), name
        want = m.eval_backbone().model.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in dst.model.state_dict().items()), name
    torch.save({"method": "nope", "step": 0, "method_state": {}}, tmp_path / "other.pt")
    with pytest.raises(Exception, match="method 'nope', which is not registered"):
        create_backbone("vit_tiny_d4_p8", init=str(tmp_path / "other.pt"))


def test_init_from_a_final_pt_that_records_its_prefix_needs_no_method(tmp_path):
    """``final.pt`` records ``eval_backbone_prefix``: ``--init`` takes exactly those tensors, even when the
    method that wrote the file is not registered here."""
    import torch

    from bench.backbones import create_backbone

    torch.manual_seed(0)
    a, b = create_backbone("vit_tiny_d4_p8"), create_backbone("vit_tiny_d4_p8")
    state = {f"branch_a.backbone.{k}": v for k, v in a.state_dict().items()}
    state.update({f"branch_b.backbone.{k}": v for k, v in b.state_dict().items()})
    torch.save({"method": "not_registered_here", "step": 1, "method_state": state,
                "eval_backbone_prefix": "branch_b.backbone."}, tmp_path / "final.pt")
    dst = create_backbone("vit_tiny_d4_p8", init=str(tmp_path / "final.pt"))
    for k, v in dst.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert not torch.equal(a.model.state_dict()["pos_embed"], b.model.state_dict()["pos_embed"])


def test_relative_init_reaches_the_workers_as_an_absolute_path(tmp_path, monkeypatch):
    """Ray workers run in their own working directory: a relative ``--init`` must be resolved by the driver."""
    import os

    import torch

    import bench.pipeline
    from bench.backbones import create_backbone

    (tmp_path / "ck").mkdir()
    torch.save({"state_dict": create_backbone("vit_tiny_d4_p8").model.state_dict()}, tmp_path / "ck" / "w.pt")
    seen = {}
    monkeypatch.setattr(bench.pipeline, "run", lambda cfg, progress: seen.setdefault("init", cfg.backbone.init))
    assert main(["run", "--init", "ck/w.pt", "--no-progress"]) == 0
    assert seen["init"] == os.path.join(str(tmp_path), "ck", "w.pt")


def test_unwritable_storage(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, err = _err(capsys, ["run", "--storage", "afile/sub", "--no-progress"])
    assert code == 2 and "run.storage" in err and "cannot create it" in err


def test_leaderboard_on_missing_store(capsys):
    code, err = _err(capsys, ["leaderboard", "--tracking-uri", "sqlite:///nowhere/x.db"])
    assert code == 2 and "no MLflow store" in err


def test_help_lists_registered_components(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "registered: methods" in out and "dino" in out and "linseg" in out


def test_submit_parses_the_bench_command_after_double_dash():
    from bench.cli import build_parser
    from bench.submit import build_entrypoint, runtime_env

    args = build_parser().parse_args(["submit", "--address", "http://h:8265", "--", "run", "--methods", "dino"])
    assert args.command == "submit" and args.bench_command == ["--", "run", "--methods", "dino"]
    entry = build_entrypoint(["run", "--methods", "vice,clove"])
    assert entry == "python -m bench run --methods vice,clove --address auto --no-progress"
    env = runtime_env(pip=True)
    assert ".venv" in env["excludes"] and "bench_runs" in env["excludes"]
    assert any(r.startswith("torch") for r in env["pip"]) and env["env_vars"]["RAY_AUTH_MODE"]


def test_submit_without_a_command_is_one_line(capsys):
    code, err = _err(capsys, ["submit", "--address", "http://127.0.0.1:1"])
    assert code == 2 and err.startswith("error: ")
