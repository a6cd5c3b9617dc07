"""The run directory both trainers write into: held by one job at a time, and resumed only by its plan.

The hold is an exclusive `flock` on `run_dir/.lock`, taken by the main process for the life of the
job. The kernel releases it when the process ends, however it ends (`kill -9` included), so a lock
never goes stale and `--resume` after a crash is never blocked; a second job meanwhile is refused at
once, told who holds the directory. (flock is advisory and local: on NFS it depends on the server's
lock support.)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from mlm_pretrain.errors import InputError

log = logging.getLogger(__name__)

LOCK = ".lock"
_held: dict[Path, int] = {}  # run dir -> open file descriptor holding its lock, for this process's life


def hold_run_dir(run_dir: Path, accelerator) -> None:
    """Take the run directory for this job, or raise `InputError` naming the job that holds it.
    Every process calls this; all of them raise when it is held elsewhere."""
    run_dir = Path(run_dir).resolve()
    holder = None
    if accelerator.is_main_process and run_dir not in _held:
        holder = _lock(run_dir)
    if accelerator.num_processes > 1:
        held = torch.tensor(float(holder is not None), device=accelerator.device)
        refused = accelerator.reduce(held, "max")
        if refused and holder is None:
            holder = "another job (see the main process's message)"
    if holder is not None:
        raise InputError(f"{run_dir} is in use by {holder}: wait for it to end or choose another --out")


def _lock(run_dir: Path) -> str | None:
    """Lock `run_dir` for this process; None on success, else a description of the holder."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            who = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            who = {}
        os.close(fd)
        if not who:
            return "another job"
        return f"pid {who.get('pid')} on {who.get('host')} (since {who.get('since')}: {who.get('command')})"
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[run_dir] = fd
    return None


def checkpoint_to_resume(recipe, run_dir: Path) -> Path | None:
    """The newest verified checkpoint to resume from, after checking it belongs to the same plan.

    `--resume` is safe to repeat (what a requeued job does): with no checkpoint yet it starts fresh."""
    from mlm_pretrain.checkpoint import complete_checkpoints, latest_checkpoint

    if complete_checkpoints(run_dir) and not recipe.impl.resume:
        raise InputError(
            f"{run_dir} already holds checkpoints: continue with --resume, or choose another --out"
        )
    latest = latest_checkpoint(run_dir) if recipe.impl.resume else None
    if latest is None:
        if recipe.impl.resume:
            log.info("no usable checkpoint in %s: starting from scratch", run_dir)
        return None
    trainer_state = latest / "trainer_state.json"  # an MLM checkpoint's; word2vec's are never sharded
    written = trainer_state.exists() and json.loads(trainer_state.read_text()).get("sharded", False)
    if written != (recipe.impl.parallel == "fsdp"):
        was = "fsdp" if written else "ddp"
        raise InputError(
            f"{latest} was written with impl.parallel={was}: resume it with impl.parallel={was} (DDP "
            "and FSDP checkpoints hold the model in different forms); nothing was changed"
        )
    saved = recipe.plan_of(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    changed = sorted(_differences(saved, recipe.plan()))
    if changed:
        raise InputError(
            f"{run_dir}/recipe.yaml differs from this recipe in {', '.join(changed)}: a resumed run keeps "
            "its plan (only impl.* settings and optim.micro_batch_size may change); choose another --out"
        )
    return latest


def write_recipe(recipe, run_dir: Path, accelerator) -> None:
    """Record the recipe in the run directory, once every process has read the old one."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (Path(run_dir) / "recipe.yaml").write_text(yaml.safe_dump(asdict(recipe), sort_keys=False))


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = set(a) | set(b)
    out = []
    for key in keys:
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            out.append(f"{prefix}{key}")
    return out
