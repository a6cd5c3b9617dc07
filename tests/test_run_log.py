"""Experiment tracking: `impl.log_with` / `--log-with` through accelerate's trackers, all offline."""

import json
import os

import pytest
from test_trainer import TINY, pretrain, records

from mlm_pretrain.cli import main
from mlm_pretrain.errors import InputError
from mlm_pretrain.recipe import load_recipe
from mlm_pretrain.run_log import run_config, trackers
from mlm_pretrain.schema import PretrainRecipe


def test_tracker_names_are_checked_with_the_recipe_and_a_single_name_is_a_list():
    recipe = load_recipe(PretrainRecipe, overrides=["max_steps=1", "impl.log_with=mlflow"])
    assert recipe.impl.log_with == ["mlflow"]
    assert PretrainRecipe().impl.log_with == ["tensorboard"]
    with pytest.raises(InputError, match=r"impl.log_with=\[tensorboard, tensorbored\].*'tensorbored'") as err:
        load_recipe(PretrainRecipe, overrides=["impl.log_with=[tensorboard, tensorbored]"])
    assert {"tensorboard", "mlflow", "wandb", "trackio"} <= set(
        str(err.value).split("valid: ")[1].split(", ")
    )


def test_a_missing_tracker_package_names_the_pip_extra_before_the_run(tmp_path, monkeypatch, capsys):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard"])
    with pytest.raises(
        InputError, match=r'the wandb tracker needs its package: pip install "mlm-pretrain\[wandb\]"'
    ):
        trackers(["tensorboard", "wandb"], tmp_path)
    with pytest.raises(InputError, match="the aim tracker needs its package: pip install aim$"):
        trackers(["aim"], tmp_path)

    code = main(["pretrain", *TINY, "--out", str(tmp_path / "run"), "--log-with", "tensorboard", "mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert 'the mlflow tracker needs its package: pip install "mlm-pretrain[mlflow]"' in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_run_config_holds_the_recipe_vocabulary_and_corpus():
    config = run_config(
        {"seed": 0, "data": {"corpus": ["@sample", {"path": "hf:x", "weight": 2.0, "split": "dev"}]}}, 8192
    )
    assert config["seed"] == 0 and config["vocab_size"] == 8192
    assert config["data.sources"] == "@sample; hf:x (weight 2.0, split dev)"


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_loss_of_every_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(tmp_path, "--max-steps", "3")  # tensorboard is the default
    (events,) = {p.parent for p in (tmp_path / "tensorboard").glob("events.out.tfevents.*")}
    scalars = EventAccumulator(str(events)).Reload().Scalars("loss")
    expected = records(tmp_path, "loss")
    assert [s.step for s in scalars] == [step for step, _ in expected] == [1, 2, 3]
    assert [s.value for s in scalars] == pytest.approx([loss for _, loss in expected], rel=1e-6)


@pytest.mark.slow
def test_mlflow_gets_params_every_loss_and_the_loss_curve(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    # a local file store; MLflow 3 keeps it only on request (a database store needs the full package)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    pretrain(
        tmp_path / "run", "--max-steps", "3", "--log-with", "tensorboard", "mlflow", env=dict(os.environ)
    )

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("mlm-pretrain").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["optim.batch_size"] == "8" and params["impl.log_with"] == "['tensorboard', 'mlflow']"
    assert params["vocab_size"] == "8192" and params["data.sources"] == "@sample"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == records(tmp_path / "run", "loss")
    assert "eval_loss" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["loss_curve.png"]


@pytest.mark.slow
def test_wandb_offline_keeps_the_run_with_its_config_losses_and_loss_curve(tmp_path):
    pytest.importorskip("wandb")
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_SILENT": "true",
    }
    pretrain(tmp_path / "run", "--max-steps", "3", "--log-with", "wandb", env=env)

    (offline,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    assert list((offline / "files" / "media" / "images").glob("loss_curve_*.png"))
    # the run's transaction log is protobuf: its keys and values are there as text, values as JSON
    (log,) = offline.glob("run-*.wandb")
    raw = log.read_bytes()
    assert b"mlm-pretrain" in raw and b"optim.batch_size" in raw and b"data.sources" in raw
    assert all(json.dumps(loss).encode() in raw for _, loss in records(tmp_path / "run", "loss"))
    assert not (tmp_path / "run" / "tensorboard").exists()  # only the trackers asked for
