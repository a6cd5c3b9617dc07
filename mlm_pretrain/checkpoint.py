"""Save and restore everything a run needs to continue exactly; export the Hugging Face directory.

A checkpoint `run/checkpoints/step-000120/` holds the model (safetensors), the optimizer state, the
trainer's counters, and per rank the RNG states and the data stream's position. It is written under a
temporary name, fsynced, described by `manifest.json` (each file's size and sha256) and only then
renamed, so a crash mid-save never leaves a directory that looks like a checkpoint. One damaged later
(a truncated copy, a bad disk) no longer matches its manifest: resuming skips it, with a warning, for
the newest one that does. Loading never unpickles code: weights come from safetensors, the optimizer
and RNG states through `torch.load(weights_only=True)`, the stream position from JSON.

A full disk while writing a checkpoint or an export removes what was half written, leaves what was
there before as it was, and raises `DiskFullError` (in every process of a run).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from mlm_pretrain.errors import DiskFullError, InputError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
DATA = "data.json"  # the data stream's position
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
BYTES_PER_PARAMETER = 12  # fp32 weights and AdamW's two fp32 moments
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_CHUNK = 1 << 20
_OK, _FAILED, _FULL = 0, 1, 2  # how a rank's part of a checkpoint went


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
    """Write checkpoint `step` of an MLM run atomically (all ranks call this), keep the newest `keep_last`.

    The model and optimizer go in whole (safetensors, torch) under DDP, and as every process's shards
    through torch.distributed.checkpoint (DCP) under FSDP, which can load them into any number of
    processes. The data position is the last rank's: its stream has made every block of the step (the
    ranks take the step's blocks in turn), so any rank of any process count continues from it exactly.
    """
    from mlm_pretrain.parallel import is_sharded

    unwrapped = accelerator.unwrap_model(model)
    sharded = is_sharded(unwrapped)

    def write_rank_files(partial: Path, rank: int) -> None:
        torch_save({"torch": torch.get_rng_state(), "python": random.getstate()}, partial / f"rng-{rank}.pt")
        if rank == accelerator.num_processes - 1:
            (partial / DATA).write_text(json.dumps(data_state, default=_jsonable))
        if sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optimizer_state = get_state_dict(unwrapped, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=partial)

    def write_shared_files(partial: Path) -> None:
        if not sharded:
            save_model(unwrapped, str(partial / "model.safetensors"))
            torch_save(optimizer.state_dict(), partial / "optimizer.pt")
        state = {**trainer_state, "processes": accelerator.num_processes, "sharded": sharded}
        (partial / "trainer_state.json").write_text(json.dumps(state, indent=2))

    estimate = checkpoint_size_estimate(unwrapped)
    return write_atomically(
        run_dir, step, accelerator, write_rank_files, write_shared_files, keep_last, estimate
    )


def write_atomically(
    run_dir: Path,
    step: int,
    accelerator,
    write_rank_files: Callable[[Path, int], None],
    write_shared_files: Callable[[Path], None],
    keep_last: int,
    size_estimate: int | None = None,
) -> Path:
    """The checkpoint protocol: every rank writes its files into `step-N.partial`, the main process its
    shared ones; once all have, the main process fsyncs them, writes the manifest, renames the directory
    `step-N` (atomic) and removes older ones beyond `keep_last`.

    After each stage the ranks agree on whether it worked everywhere, so that a rank that failed (a full
    disk, most likely) never leaves the others waiting at a barrier: every rank raises, the partial
    directory goes, and the checkpoints before it are untouched. `size_estimate` (bytes) is what the
    disk-full message quotes until there is an earlier checkpoint to measure.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:06d}"
    partial = root / f"step-{step:06d}.partial"
    main = accelerator.is_main_process

    def prepare() -> None:
        if main:
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash: never trusted
            partial.mkdir(parents=True)

    def write() -> None:
        write_rank_files(partial, accelerator.process_index)
        if main:
            write_shared_files(partial)

    def publish() -> None:
        if main:
            _write_manifest(partial)
            shutil.rmtree(final, ignore_errors=True)  # a damaged one that resuming skipped, or a re-save
            partial.rename(final)
            _fsync_directory(root)
            _prune(run_dir, keep_last, final)

    def disk_full() -> DiskFullError:
        previous = complete_checkpoints(run_dir)
        needed = _directory_size(previous[-1][1]) if previous else size_estimate
        advice = "free some space and continue with --resume: the checkpoints before it are as they were"
        return disk_full_error(final, advice, needed)

    for stage in (prepare, write, publish):
        _on_every_rank(accelerator, stage, partial, disk_full)
    return final


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint directory, oldest first, without verifying them."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest; each newer one that does not is skipped
    with a warning naming the file at fault."""
    for _, path in reversed(complete_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except InputError as err:
            log.warning("skipping checkpoint %s: %s", path, err)
            continue
        return path
    return None


def verify_checkpoint(path: Path) -> None:
    """Check each file `manifest.json` lists against its size, then its sha256; raise `InputError`
    naming the first that differs. Sizes come first, so a truncated file costs no reading."""
    path = Path(path)
    manifest = path / MANIFEST
    try:
        entries = json.loads(manifest.read_text())["files"]
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in entries.items()}
    except FileNotFoundError:
        raise InputError(
            f"{manifest} is missing: the checkpoint was written by an older version, or not finished"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"{manifest} is damaged ({type(err).__name__}: {err})") from err
    for name, (size, _) in expected.items():
        file = path / name
        if not file.is_file():
            raise InputError(f"{file} is missing")
        if (actual := file.stat().st_size) != size:
            raise InputError(
                f"{file} has {actual} bytes where the manifest says {size}: truncated or damaged"
            )
    for name, (_, sha256) in expected.items():
        file = path / name
        try:
            matches = _sha256(file) == sha256
        except OSError as err:
            raise InputError(f"{file} cannot be read ({err})") from err
        if not matches:
            raise InputError(f"{file} does not match its sha256 in the manifest: damaged")


def load_checkpoint(
    path: Path, accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict, dict]:
    """Restore model, optimizer and this rank's RNG states; return (data state, trainer state).
    A file that cannot be loaded raises `InputError` naming it.

    A checkpoint resumes with another number of processes: the model and optimizer are whole (DDP) or
    resharded by DCP (FSDP), and the data position is the global stream's. Only dropout's random
    streams restart on ranks the old run did not have. A DDP checkpoint is not loaded into an FSDP
    run or the reverse (`run_dir.checkpoint_to_resume` refuses that before anything is written)."""
    from mlm_pretrain.parallel import is_sharded

    unwrapped = accelerator.unwrap_model(model)
    with _loading(path / "trainer_state.json") as file:
        trainer_state = json.loads(file.read_text())
    if is_sharded(unwrapped):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        with _loading(path / ".metadata"):
            model_state, optimizer_state = get_state_dict(unwrapped, optimizer)
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
            set_state_dict(
                unwrapped, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state
            )
    else:
        with _loading(path / "model.safetensors") as file:
            load_model(unwrapped, str(file))
        with _loading(path / "optimizer.pt") as file:
            optimizer.load_state_dict(torch.load(file, weights_only=True))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if rng_file.exists():
        with _loading(rng_file):
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["torch"])
            random.setstate(_as_tuples(rng["python"]))
    if trainer_state.get("processes", accelerator.num_processes) != accelerator.num_processes:
        log.warning(
            "%s was written by %d processes and resumes in %d: weights, optimizer and data position carry "
            "over exactly; dropout's random streams do not",
            path,
            trainer_state["processes"],
            accelerator.num_processes,
        )
    with _loading(path / DATA) as file:
        data_state = json.loads(file.read_text())
    return data_state, trainer_state


def export_model(
    model: torch.nn.Module,
    tokenizer,
    out_dir: Path,
    card: str,
    recipe_yaml: str,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A Hugging Face directory: config.json, model.safetensors, tokenizer files, README.md, recipe.yaml.
    Written whole under a temporary name (`atomic_directory`), it replaces an older one only when complete.

    It loads under transformers 4.x as under 5 (`portable_config`, `save_tokenizer`), and the tokenizer's
    `model_max_length` is the positions the model has, so `truncation=True` (pipelines, `Trainer`) cuts
    long inputs to what the model takes. No BERT pooler is written: the masked-LM model has none to
    train, so it would be random weights that loading for masked LM reports as unused; loading for
    classification reports the pooler and the classifier as new, the head fine-tuning trains.
    `state` (default: the model's own) is the weights to write: with FSDP, the model's parameters are
    shards and the caller passes the gathered whole.
    """
    from mlm_pretrain.models import make_config_portable, usable_positions
    from mlm_pretrain.tokenizer import save_tokenizer

    out_dir = Path(out_dir)
    state = model.state_dict() if state is None else state
    weights = sum(t.numel() * t.element_size() for t in state.values())
    with atomic_directory(out_dir, size_estimate=weights) as partial:
        model.save_pretrained(partial, state_dict=state, safe_serialization=True)
        make_config_portable(partial)
        save_tokenizer(tokenizer, partial, model_max_length=usable_positions(model.config))
        (partial / "README.md").write_text(card)
        (partial / "recipe.yaml").write_text(recipe_yaml)
    return out_dir


@contextmanager
def atomic_directory(path: Path, size_estimate: int | None = None) -> Iterator[Path]:
    """Yield `<path>.partial` to write a directory into; when the block ends, fsync it and rename it
    `path`, moving an older `path` aside (`<path>.old`, then removed) only then. If the block raises,
    the partial directory is removed and `path` is as it was; a full disk raises `DiskFullError`
    quoting `size_estimate` bytes (or the older directory's size) as what is needed.

    A crash between the two renames leaves `<path>.old` and no `path`, never a half-written `path`.
    """
    path = Path(path)
    partial = path.with_name(f"{path.name}.partial")
    aside = path.with_name(f"{path.name}.old")
    shutil.rmtree(partial, ignore_errors=True)  # left by a crash: never trusted
    try:
        partial.mkdir(parents=True)
        yield partial
        _fsync_tree(partial)
        if path.exists():
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
        partial.rename(path)
        _fsync_directory(path.parent)
    except Exception as err:
        shutil.rmtree(partial, ignore_errors=True)
        if aside.exists() and not path.exists():  # the final rename failed: the old one returns
            aside.rename(path)
        if is_disk_full(err):
            needed = size_estimate or (_directory_size(path) if path.is_dir() else None)
            raise disk_full_error(
                path, f"free some space and try again; {path} is as it was", needed
            ) from err
        raise
    shutil.rmtree(aside, ignore_errors=True)


def torch_save(obj, path: Path) -> None:
    """`torch.save` through a Python file: on a full disk, torch.save(path) raises a RuntimeError that
    says only "unexpected pos"; written this way the ENOSPC OSError comes with it (see `is_disk_full`)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def is_disk_full(err: BaseException | None) -> bool:
    """Whether `err`, or an error it was raised from, is a full disk (ENOSPC) or quota (EDQUOT).
    Libraries wrap it: torch.save raises a RuntimeError from the OSError, safetensors a SafetensorError
    whose message ends "No space left on device (os error 28)"."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return True
        if any(os.strerror(code) in str(err) for code in _DISK_FULL):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_error(path: Path, advice: str, needed: int | None = None) -> DiskFullError:
    """The error for a write to `path` that ran out of space: the path, the space free on its disk now
    (what was half written has been removed), about what it needs, and `advice`."""
    free = shutil.disk_usage(_existing(path)).free
    needs = f"; it needs about {_human(needed)}" if needed else ""
    return DiskFullError(
        f"the disk is full: writing {path} failed ({_human(free)} free there{needs}); {advice}"
    )


def checkpoint_size_estimate(model: torch.nn.Module) -> int:
    """About the bytes of one checkpoint of `model` trained with AdamW: fp32 weights and two moments."""
    return BYTES_PER_PARAMETER * sum(p.numel() for p in model.parameters())


def warn_if_disk_low(run_dir: Path, bytes_per_checkpoint: int) -> bool:
    """Warn (and return True) when the disk of `run_dir` has less free space than two checkpoints need,
    as a new one is written before the one before it goes. The newest checkpoint's size, where there is
    one, stands in for `bytes_per_checkpoint`. For the main process, before training starts."""
    previous = complete_checkpoints(run_dir)
    size = _directory_size(previous[-1][1]) if previous else bytes_per_checkpoint
    free = shutil.disk_usage(_existing(Path(run_dir))).free
    if free >= 2 * size:
        return False
    log.warning(
        "only %s free on the disk of %s, where two checkpoints need about %s: the run may stop on a "
        "full disk (it can continue with --resume once there is space)",
        _human(free),
        run_dir,
        _human(2 * size),
    )
    return True


def _on_every_rank(
    accelerator, stage: Callable[[], None], partial: Path, disk_full: Callable[[], DiskFullError]
) -> None:
    """Run `stage` here, then learn from every rank whether it worked there. A rank that raised on its
    own would leave the others waiting at the next collective for good: if any failed, the partial
    directory goes and every rank raises, `disk_full()` if any rank found the disk full."""
    error = None
    try:
        stage()
    except Exception as err:
        error = err
    codes = torch.zeros(accelerator.num_processes, device=accelerator.device)
    codes[accelerator.process_index] = _FULL if is_disk_full(error) else _FAILED if error else _OK
    codes = accelerator.reduce(codes, "sum").tolist()
    if not any(codes):
        return
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    if _FULL in codes:
        raise disk_full() from error
    if error is not None:
        raise error
    failed = ", ".join(str(rank) for rank, code in enumerate(codes) if code)
    raise RuntimeError(f"writing {partial} failed in process {failed}: see its error")


def _write_manifest(partial: Path) -> None:
    """fsync every file (the other ranks' too: they all wrote before the barrier), record its size and
    sha256 in `manifest.json`, last, and fsync that and the directory."""
    files = {}
    for file in sorted(p for p in partial.iterdir() if p.is_file()):
        files[file.name] = {"size": file.stat().st_size, "sha256": _sha256(file, fsync=True)}
    with (partial / MANIFEST).open("w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_directory(partial)


def _prune(run_dir: Path, keep_last: int, newest: Path) -> None:
    """Keep the newest `keep_last` checkpoints and, whatever their order, the one just written: its
    manifest was computed from its files on disk, so it is the last verified one."""
    if keep_last <= 0:
        return
    found = [path for _, path in complete_checkpoints(run_dir)]
    keep = {*found[-keep_last:], newest}
    for old in found:
        if old not in keep:
            shutil.rmtree(old)


@contextmanager
def _loading(file: Path) -> Iterator[Path]:
    try:
        yield file
    except Exception as err:
        raise InputError(
            f"cannot load {file} ({type(err).__name__}: {err}): the checkpoint is damaged or was not "
            f"written for this model; move {file.parent} aside to resume from the one before it"
        ) from err


def _sha256(file: Path, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for parent, _, names in os.walk(directory, topdown=False):
        for name in names:
            with open(os.path.join(parent, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_directory(Path(parent))


def _fsync_directory(directory: Path) -> None:
    """Makes the directory's entries (a new file, a rename) durable, not only the files' contents."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _directory_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent, for `shutil.disk_usage`."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _human(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    raise TypeError(f"cannot save {type(value).__name__} in a checkpoint's data state")


def _as_tuples(value):
    """`random.setstate` wants the nested tuples that torch.save/load may hand back as lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
