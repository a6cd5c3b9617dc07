"""Save and restore everything a run needs to continue exactly; export the Hugging Face directory.

A checkpoint `run/checkpoints/step-000120/` holds the model (safetensors), the optimizer state, the
trainer's counters, and per rank the RNG states and the data stream's position. It is written under a
temporary name and renamed when complete, so a crash mid-save never leaves a directory that looks like
a checkpoint. Loading never unpickles code: weights come from safetensors, the optimizer and RNG
states through `torch.load(weights_only=True)`, the stream position from JSON.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from mlm_pretrain.errors import InputError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")


def save_checkpoint(
    run_dir: Path,
    step: int,
    accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_state: dict,
    trainer_state: dict,
    keep_last: int,
) -> Path:
    """Write checkpoint `step` of an MLM run atomically (all ranks call this), keep the newest `keep_last`."""

    def write_rank_files(partial: Path, rank: int) -> None:
        torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, partial / f"rng-{rank}.pt")
        (partial / f"data-{rank}.json").write_text(json.dumps(data_state, default=_jsonable))

    def write_shared_files(partial: Path) -> None:
        save_model(accelerator.unwrap_model(model), str(partial / "model.safetensors"))
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        (partial / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))

    return write_atomically(run_dir, step, accelerator, write_rank_files, write_shared_files, keep_last)


def write_atomically(
    run_dir: Path, step: int, accelerator, write_rank_files, write_shared_files, keep_last: int
) -> Path:
    """The checkpoint protocol: every rank writes its files into `step-N.partial`, the main process its
    shared ones, then the directory is renamed `step-N` (atomic) and older ones beyond `keep_last` go."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:06d}"
    partial = root / f"step-{step:06d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash: never trusted
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_rank_files(partial, accelerator.process_index)
    if accelerator.is_main_process:
        write_shared_files(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for _, old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def load_checkpoint(
    path: Path, accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict, dict]:
    """Restore model, optimizer and this rank's RNG states; return (data state, trainer state)."""
    rank = accelerator.process_index
    rng_file, data_file = path / f"rng-{rank}.pt", path / f"data-{rank}.json"
    if not rng_file.exists() or not data_file.exists():
        raise InputError(
            f"{path} was written by a run with fewer processes (no state for rank {rank}); "
            "resume with the same number of processes"
        )
    load_model(accelerator.unwrap_model(model), str(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(rng_file, weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuples(rng["python"]))
    return json.loads(data_file.read_text()), json.loads((path / "trainer_state.json").read_text())


def export_model(model: torch.nn.Module, tokenizer, out_dir: Path, card: str, recipe_yaml: str) -> Path:
    """A Hugging Face directory: config.json, model.safetensors, tokenizer files, README.md, recipe.yaml.

    A BERT masked-LM model has no pooler, but BertForSequenceClassification uses one: we add a freshly
    initialised pooler (as bert-base checkpoints carry one), so loading for classification reports only
    the classifier as new.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.model_type == "bert":
        generator = torch.Generator().manual_seed(0)
        hidden = model.config.hidden_size
        state["bert.pooler.dense.weight"] = (
            torch.randn(hidden, hidden, generator=generator) * model.config.initializer_range
        )
        state["bert.pooler.dense.bias"] = torch.zeros(hidden)
    model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(card)
    (out_dir / "recipe.yaml").write_text(recipe_yaml)
    return out_dir


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(f"cannot save {type(value).__name__} in a checkpoint's data state")


def _as_tuples(value):
    """`random.setstate` wants the nested tuples that torch.save/load may hand back as lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
