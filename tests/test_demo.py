"""The README's main command, end to end, on a short budget."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_run_dir import hold_in_another_process

from mlm_pretrain import cli
from mlm_pretrain.run_dir import LOCK

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_leaves_a_run_directory_another_job_holds_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["demo"])
    checkpoint = tmp_path / "pretrain" / "checkpoints" / "step-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    holder = hold_in_another_process(tmp_path / "pretrain")
    try:
        assert cli.main(["demo", "--out", str(tmp_path)]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"pretrain is in use by pid {holder.pid} on " in capsys.readouterr().err
    assert (checkpoint / "model.safetensors").read_bytes() == b"weights"
    assert not (tmp_path / "tokenizer").exists()  # refused before anything ran


@pytest.mark.parametrize("option", ["--tokens", "--seeds"])
def test_the_demo_refuses_an_empty_budget_before_anything_runs(option, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["demo"])
    assert cli.main(["demo", "--out", str(tmp_path), option, "0"]) == 2
    assert f"{option} must be at least 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_demo_starts_over_holding_the_run_directory(tmp_path):
    from mlm_pretrain.cli.demo import start_over

    run_dir = tmp_path / "pretrain"
    (run_dir / "checkpoints" / "step-5").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    start_over(run_dir)
    assert [p.name for p in run_dir.iterdir()] == [LOCK]  # the lock stays: it is held, not stale


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_prints_the_comparison(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlm_pretrain",
            "demo",
            "--out",
            str(tmp_path),
            "--tokens",
            "60000",
            "--seeds",
            "2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,  # not the repo: the package must suffice
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 60,000 tokens" in result.stdout
    table = result.stdout[result.stdout.index("| model | score | seeds | learning rate |") :]
    cells = [[cell.strip() for cell in line.split("|")[1:5]] for line in table.splitlines()[2:5]]
    rows = {name: float(score) for name, score, _, _ in cells}
    assert set(rows) == {
        "our pretrained checkpoint",
        "same architecture, random init",
        "TF-IDF + logistic regression",
    }
    assert all(0.3 < score <= 1.0 for score in rows.values())
    assert rows["TF-IDF + logistic regression"] > 0.65  # a real baseline on real data
    assert all(lr in ("0.0003", "0.001") for *_, lr in cells[:2])  # each encoder's pick from one grid

    saved = json.loads((tmp_path / "finetune" / "results.json").read_text())
    assert saved["config"]["pooling"] == "mean"
    for side, (name, _, spread, _) in zip((saved, saved["random_init"]), cells[:2], strict=True):
        scores = sorted(run["scores"]["test"]["score"] for run in side["seeds"])
        assert len(scores) == 2 and spread == f"{scores[0]:.4f}-{scores[-1]:.4f}", name
    # the verdict line follows the seeds: one of three readings, the one the scores imply
    ours = [run["scores"]["test"]["score"] for run in saved["seeds"]]
    scratch = [run["scores"]["test"]["score"] for run in saved["random_init"]["seeds"]]
    expected = (
        "beyond the seed spread"
        if min(ours) > max(scratch)
        else "pretraining hurt"
        if min(scratch) > max(ours)
        else "within the seed spread"
    )
    assert expected in table
    for path in (
        "tokenizer/tokenizer.json",
        "pretrain/final/model.safetensors",
        "pretrain/loss_curve.png",
        "finetune/results.md",
        "finetune/model/model.safetensors",
    ):
        assert (tmp_path / path).exists(), path
    assert "## Fine-tuning results" in (tmp_path / "finetune/pretrained_model_card.md").read_text()
    assert "## Fine-tuning results" not in (tmp_path / "pretrain/final/README.md").read_text()
