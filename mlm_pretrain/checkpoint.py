"""Save and restore everything a run needs to continue exactly; export the Hugging Face directory.

A checkpoint `run/checkpoints/step-000120/` holds the model (safetensors), the optimizer state, the
trainer's counters, and per rank the RNG states and the data stream's position. It is written under a
temporary name, fsynced, described by `manifest.json` (each file's size and sha256) and only then
renamed, so a crash mid-save never leaves a directory that looks like a checkpoint. One damaged later
(a truncated copy, a bad disk) no longer matches its manifest: resuming skips it, with a warning, for
the newest one that does. Weights come from safetensors, the optimizer and RNG states through
`torch.load(weights_only=True)`, the stream position from JSON; but under FSDP, DCP reads its metadata
and the optimizer's non-tensor entries with pickle, which runs whatever code a writer put there. So a
checkpoint of any kind is resumed only when no other user can have written it (`check_trusted`).

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
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from mlm_pretrain.errors import DiskFullError, InputError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
DATA = "data.json"  # the data stream's position
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
BYTES_PER_PARAMETER = 12  # fp32 weights and AdamW's two fp32 moments
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_CHUNK = 1 << 20


@dataclass
class CheckpointFiles:
    """An objective's part of a checkpoint: what each rank writes on its own (`per_rank(partial, rank)`,
    local files only), what all ranks write together (`collective(partial)`: DCP's sharded save, whose
    collectives every rank must enter), and what the main process writes (`shared(partial)`). The run
    adds `trainer_state.json` (its counters). `size_estimate` (bytes) is what a disk-full message quotes
    until there is an earlier checkpoint to measure."""

    per_rank: Callable[[Path, int], None]
    shared: Callable[[Path], None] = lambda partial: None
    collective: Callable[[Path], None] | None = None
    size_estimate: int | None = None
    sharded: bool = False


def mlm_files(accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data_state: dict):
    """A torch objective's checkpoint (every rank calls this).

    The model and optimizer go in whole (safetensors, torch) under DDP, and as every process's shards
    through torch.distributed.checkpoint (DCP) under FSDP, which can load them into any number of
    processes. The data position is the last rank's: its stream has made every block of the step (the
    ranks take the step's blocks in turn), so any rank of any process count continues from it exactly.
    """
    from mlm_pretrain.parallel import is_sharded

    unwrapped = accelerator.unwrap_model(model)
    sharded = is_sharded(unwrapped)

    def per_rank(partial: Path, rank: int) -> None:
        torch_save({"torch": torch.get_rng_state(), "python": random.getstate()}, partial / f"rng-{rank}.pt")
        if rank == accelerator.num_processes - 1:
            (partial / DATA).write_text(json.dumps(data_state, default=_jsonable))

    def collective(partial: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(unwrapped, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=partial)

    def shared(partial: Path) -> None:
        if not sharded:
            save_model(unwrapped, str(partial / "model.safetensors"))
            torch_save(optimizer.state_dict(), partial / "optimizer.pt")

    return CheckpointFiles(
        per_rank,
        shared,
        collective if sharded else None,
        size_estimate=checkpoint_size_estimate(unwrapped),
        sharded=sharded,
    )


def write_atomically(
    run_dir: Path, step: int, accelerator, files: CheckpointFiles, counters: dict, keep_last: int
) -> Path:
    """Write checkpoint `step` (all ranks call this), keep the newest `keep_last`.

    Every rank writes its files into `step-N.partial`, then all together their collective part, then
    the main process its shared ones, `trainer_state.json` (`counters` and how the checkpoint was
    written) and a copy of the run's `recipe.yaml`; once all have, the main process fsyncs them,
    writes the manifest, renames the directory `step-N` (atomic) and removes older ones beyond
    `keep_last`; what it wrote is made writable by its owner only (`check_trusted`).

    After each stage the ranks agree on whether it worked everywhere, so that a rank that failed (a full
    disk, most likely) never leaves the others waiting in a collective it skipped: every rank raises,
    the partial directory goes, and the checkpoints before it are untouched.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step-{step:06d}"
    partial = root / f"step-{step:06d}.partial"
    main = accelerator.is_main_process

    def prepare() -> None:
        if main:
            # left by a crash of a job on this run directory, whose lock this job holds: ours to remove
            # (unlike `atomic_directory`'s leftovers, which no lock vouches for), never trusted
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)

    def per_rank() -> None:
        files.per_rank(partial, accelerator.process_index)

    def collective() -> None:
        if files.collective is not None:
            files.collective(partial)

    def shared() -> None:
        if main:
            files.shared(partial)
            if (Path(run_dir) / "recipe.yaml").exists():  # the plan, under the manifest with the rest
                shutil.copy2(Path(run_dir) / "recipe.yaml", partial / "recipe.yaml")
            state = {**counters, "processes": accelerator.num_processes, "sharded": files.sharded}
            (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2))

    def publish() -> None:
        if main:
            _write_manifest(partial)
            # resuming refuses what others could have written (`check_trusted`), whatever the umask
            for written in (root, partial, *partial.iterdir()):
                written.chmod(stat.S_IMODE(written.stat().st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
            # a damaged copy that resuming skipped; never a verified one, which a crash here would lose
            if final.exists():
                try:
                    verify_checkpoint(final)
                except InputError:
                    shutil.rmtree(final)
                else:
                    raise InputError(f"{final} exists and is complete: not overwritten")
            partial.rename(final)
            _fsync_directory(root)
            _prune(run_dir, keep_last, final)

    def disk_full() -> DiskFullError:
        previous = complete_checkpoints(run_dir)
        needed = _directory_size(previous[-1][1]) if previous else files.size_estimate
        advice = "free some space and continue with --resume: the checkpoints before it are as they were"
        return disk_full_error(final, advice, needed)

    for stage in (prepare, per_rank, collective, shared, publish):
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
        check_trusted(path)
        return path
    return None


def check_trusted(path: Path) -> None:
    """Raise `InputError` unless checkpoint `path`, its files and the directory holding it are owned by
    this user and writable by no one else: such a checkpoint may be loaded with pickle. (The manifest
    proves nothing here: whoever can write the checkpoint can rewrite it.)"""
    uid = os.getuid()
    for file in (path.parent, path, *sorted(path.rglob("*"))):
        info = file.stat()
        if info.st_uid != uid:
            problem, fix = f"is owned by uid {info.st_uid}, not this user (uid {uid})", "chown -R and "
        elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem, fix = f"is writable by others than its owner ({stat.filemode(info.st_mode)})", ""
        else:
            continue
        raise InputError(
            f"{file} {problem}: resuming may unpickle a checkpoint (DCP's metadata under FSDP), which runs "
            f"whatever code its writer put there. If every checkpoint there is yours, {fix}`chmod -R go-w "
            f"{path.parent}`, then resume; else start afresh in another --out"
        )


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


def read_trainer_state(path: Path) -> dict:
    """The run's counters in checkpoint `path`, and how it was written (processes, sharded)."""
    with loading(path / TRAINER_STATE) as file:
        return json.loads(file.read_text())


def load_checkpoint(
    path: Path, accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """Restore model, optimizer and this rank's RNG states from a `mlm_files` checkpoint; return the
    data state.
    A file that cannot be loaded raises `InputError` naming it.

    A checkpoint resumes with another number of processes: the model and optimizer are whole (DDP) or
    resharded by DCP (FSDP), and the data position is the global stream's. Only dropout's random
    streams restart on ranks the old run did not have. A DDP checkpoint is not loaded into an FSDP
    run or the reverse (`run_dir.checkpoint_to_resume` refuses that before anything is written)."""
    from mlm_pretrain.parallel import is_sharded

    unwrapped = accelerator.unwrap_model(model)
    trainer_state = read_trainer_state(path)
    if is_sharded(unwrapped):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        with loading(path / ".metadata"):
            model_state, optimizer_state = get_state_dict(unwrapped, optimizer)
            dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
            set_state_dict(
                unwrapped, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state
            )
    else:
        with loading(path / "model.safetensors") as file:
            load_model(unwrapped, str(file))
        with loading(path / "optimizer.pt") as file:
            optimizer.load_state_dict(torch.load(file, weights_only=True))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if rng_file.exists():
        with loading(rng_file):
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
    with loading(path / DATA) as file:
        return json.loads(file.read_text())


@contextmanager
def atomic_directory(path: Path, size_estimate: int | None = None, locked: bool = False) -> Iterator[Path]:
    """Yield `<path>.partial` to write a directory into; when the block ends, fsync it and rename it
    `path`, moving an older `path` aside (`<path>.old`, then removed) only then. If the block raises,
    the partial directory is removed and `path` is as it was; a full disk raises `DiskFullError`
    quoting `size_estimate` bytes (or the older directory's size) as what is needed.

    A crash between the two renames leaves `<path>.old` and no `path`, never a half-written `path`.
    Only what this call created is removed: a `<path>.partial` or `<path>.old` already there (another
    process writing `path` now, or a crash's leftover: no lock tells which) raises `InputError`
    naming it, and is left as it is, unless `locked`: the caller holds the lock of the run directory
    `path` lies in (`run_dir.hold_run_dir`), so they are a crashed job's on it: the `.old` (the `path`
    before that job's write) goes back where `path` is missing and is removed where it is not, the
    `.partial` is removed.
    """
    path = Path(path)
    partial = path.with_name(f"{path.name}.partial")
    aside = path.with_name(f"{path.name}.old")
    if locked:
        if os.path.lexists(aside) and not os.path.lexists(path):
            aside.rename(path)
        shutil.rmtree(aside, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
    if os.path.lexists(aside):
        raise InputError(
            f"{aside} exists: an earlier write of {path} stopped between its two renames, and it holds "
            f"the {path.name} before that write; keep what you need of it, remove it and try again"
        )
    created = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            partial.mkdir()  # not exist_ok: one already there is not ours
        except FileExistsError:
            raise InputError(
                f"{partial} exists: another process is writing {path} now, or one was interrupted; if "
                f"none is, remove it (it is never taken for {path.name}) and try again"
            ) from None
        created = True
        yield partial
        _fsync_tree(partial)
        if path.exists():
            path.rename(aside)
        partial.rename(path)
        _fsync_directory(path.parent)
    except Exception as err:
        if created:
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


class WriteFailed(Exception):
    """A checkpoint stage failed on some rank; every rank raises it, naming that rank (`rank`) and its
    error, so that every rank reports the same failure."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


def _on_every_rank(
    accelerator, stage: Callable[[], None], partial: Path, disk_full: Callable[[], DiskFullError]
) -> None:
    """Run `stage` here, then learn from every rank whether it worked there. A rank that raised on its
    own would leave the others waiting at the next collective for good: if any failed, the partial
    directory goes and every rank raises the same error (of the lowest rank that failed), `disk_full()`
    if any rank found the disk full."""
    from torch.distributed.checkpoint.api import CheckpointException

    error = None
    try:
        stage()
    except (Exception, CheckpointException) as err:  # DCP's error is a BaseException
        error = err
    outcome = None
    if error is not None:
        # DCP raises on every rank what failed on some: it names them
        failures = getattr(error, "failures", None) if isinstance(error, CheckpointException) else None
        origin = min(failures) if failures else accelerator.process_index
        outcome = (origin, is_disk_full(error), f"{type(error).__name__}: {error}")
    outcomes = [outcome]
    if accelerator.num_processes > 1:
        outcomes = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(outcomes, outcome)
    failed = sorted(outcome for outcome in outcomes if outcome is not None)
    if not failed:
        return
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    origin, _, text = failed[0]
    if any(full for _, full, _ in failed):
        agreed = disk_full()
        agreed.rank = origin
        raise agreed from error
    if accelerator.num_processes == 1:
        raise error
    raise WriteFailed(f"writing {partial}: {text}", origin) from error


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
def loading(file: Path) -> Iterator[Path]:
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
