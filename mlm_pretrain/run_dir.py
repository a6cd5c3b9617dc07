"""The run directory both trainers write into: held by one job at a time, and resumed only by its plan.

The hold is an exclusive `flock` on `run_dir/.lock`, taken by the main process for the life of the
job. The kernel releases it when the process ends, however it ends (`kill -9` included), so a lock
never goes stale and `--resume` after a crash is never blocked; a second job meanwhile is refused at
once, told who holds the directory. (flock is advisory and local: on NFS it depends on the server's
lock support.)
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import get_args

import torch
import yaml

from mlm_pretrain.errors import InputError
from mlm_pretrain.schema import Word2VecObjective

log = logging.getLogger(__name__)

LOCK = ".lock"
TOKENIZER_FINGERPRINT = "tokenizer.sha256"
# what transformers' tokenizers save (and SentencePiece's *.model)
TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
}
_held: dict[Path, int] = {}  # run dir -> open file descriptor holding its lock, for this process's life


def hold_run_dir(run_dir: Path, accelerator=None) -> None:
    """Take the run directory for this job, or raise `InputError` naming the job that holds it.
    Every process calls this; all of them raise when it is held elsewhere. No `accelerator`: a job of
    one process (the demo, before it clears the directory)."""
    run_dir = Path(run_dir).resolve()
    holder = None
    if (accelerator is None or accelerator.is_main_process) and run_dir not in _held:
        holder = _lock(run_dir)
    if accelerator is not None and accelerator.num_processes > 1:
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
    try:
        # not through a link: the holder's details are written into the lock, so a planted link would
        # have this job overwrite whatever file it names
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise InputError(
            f"{run_dir / LOCK} is a symbolic link, not the run directory's own lock file: remove it "
            "(nothing was written through it) and run again"
        ) from err
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
    from mlm_pretrain.checkpoint import complete_checkpoints, latest_checkpoint, read_trainer_state

    if complete_checkpoints(run_dir) and not recipe.impl.resume:
        raise InputError(
            f"{run_dir} already holds checkpoints: continue with --resume, or choose another --out"
        )
    latest = latest_checkpoint(run_dir) if recipe.impl.resume else None
    if latest is None:
        if recipe.impl.resume:
            log.info("no usable checkpoint in %s: starting from scratch", run_dir)
        return None
    written = read_trainer_state(latest).get("sharded", False)
    if written != (recipe.impl.parallel == "fsdp"):
        was = "fsdp" if written else "ddp"
        raise InputError(
            f"{latest} was written with impl.parallel={was}: resume it with impl.parallel={was} (DDP "
            "and FSDP checkpoints hold the model in different forms); nothing was changed"
        )
    # the checkpoint's own copy, which its manifest covers, where it has one
    planned = latest / "recipe.yaml" if (latest / "recipe.yaml").exists() else run_dir / "recipe.yaml"
    saved = recipe.plan_of(yaml.safe_load(planned.read_text()))
    changed = sorted(_differences(saved, recipe.plan()))
    if changed:
        raise InputError(
            f"{planned} differs from this recipe in {', '.join(changed)}: a resumed run keeps "
            "its plan (only impl.* settings and optim.micro_batch_size may change); choose another --out"
        )
    recorded = run_dir / TOKENIZER_FINGERPRINT
    tokenizer = _tokenizer_dir(recipe)
    if (
        recorded.exists()
        and tokenizer is not None
        and recorded.read_text().split()[0] != _fingerprint(tokenizer)
    ):
        raise InputError(
            f"{tokenizer}: the tokenizer's files changed since this run began (its sha256 is in "
            f"{recorded}): resumed, the model would read other token ids; restore that tokenizer or "
            "choose another --out"
        )
    return latest


def write_recipe(recipe, run_dir: Path, accelerator) -> None:
    """Record the recipe and the sha256 of its tokenizer's files in the run directory, once every process
    has read the old ones (`checkpoint_to_resume` compares them)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_atomically(Path(run_dir) / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        tokenizer = _tokenizer_dir(recipe)
        if tokenizer is not None:
            _write_atomically(
                Path(run_dir) / TOKENIZER_FINGERPRINT, f"{_fingerprint(tokenizer)}  {tokenizer}\n"
            )


def _write_atomically(path: Path, text: str) -> None:
    """`path` holds `text` whole or is as it was: a crash mid-write never leaves half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself
    finally:
        os.close(fd)


def _tokenizer_dir(recipe) -> Path | None:
    """The local tokenizer directory the run reads token ids from (None: words, or a Hub name)."""
    if recipe.objective not in get_args(Word2VecObjective):
        name = recipe.data.tokenizer
    elif recipe.word2vec.tokens == "tokenizer":
        name = recipe.word2vec.tokenizer or recipe.data.tokenizer
    else:
        return None
    return Path(name) if Path(name).is_dir() else None


def _fingerprint(tokenizer: Path) -> str:
    """sha256 of the files that define the tokenizer's ids: not the rest of a model directory given as
    the tokenizer (its weights), nor our training report (its times change on an identical rebuild)."""
    digest = hashlib.sha256()
    for file in sorted(tokenizer.iterdir()):
        if file.is_file() and (file.name in TOKENIZER_FILES or file.suffix == ".model"):
            digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = set(a) | set(b)
    out = []
    for key in keys:
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            out.append(f"{prefix}{key}")
    return out
