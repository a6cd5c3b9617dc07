"""Checkpoints and metrics against faults: damaged files, a full disk, a diverging loss (in one process)."""

import errno
import hashlib
import io
import json
import logging
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from mlm_pretrain import checkpoint
from mlm_pretrain.checkpoint import (
    atomic_directory,
    checkpoint_size_estimate,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    verify_checkpoint,
    warn_if_disk_low,
)
from mlm_pretrain.errors import DiskFullError, InputError
from mlm_pretrain.run_log import RunLog, plot_loss_curve

NO_SPACE = os.strerror(errno.ENOSPC)
SIZE = r"needs about \d+(\.\d)? (bytes|KB|MB)"


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A tiny model and an AdamW that has taken a step, so that it has moments to save."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(run_dir: Path, step: int, accelerator, keep_last: int = 0) -> Path:
    model, optimizer = trained(step)
    files = checkpoint.mlm_files(accelerator, model, optimizer, {"position": step})
    return checkpoint.write_atomically(run_dir, step, accelerator, files, {"step": step}, keep_last)


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def flip_a_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def test_a_checkpoint_lists_every_file_with_its_size_and_sha256(tmp_path, accelerator):
    path = save(tmp_path, 1, accelerator)
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    files = sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    expected = ["data.json", "model.safetensors", "optimizer.pt", "rng-0.pt", "trainer_state.json"]
    assert sorted(manifest) == files == expected
    for name, entry in manifest.items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    verify_checkpoint(path)


def test_a_checkpoint_restores_what_was_saved(tmp_path, accelerator):
    model, optimizer = trained(1)
    torch.manual_seed(7)
    files = checkpoint.mlm_files(accelerator, model, optimizer, {"position": 3})
    path = checkpoint.write_atomically(tmp_path, 1, accelerator, files, {"step": 1}, keep_last=0)
    expected_draw = torch.rand(3)

    restored, restored_optimizer = trained(2)
    assert load_checkpoint(path, accelerator, restored, restored_optimizer) == {"position": 3}
    assert read_trainer_state(path) == {"step": 1, "processes": 1, "sharded": False}
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters(), strict=True))
    moments = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(restored_optimizer.state_dict()["state"][0]["exp_avg"], moments)


@pytest.mark.parametrize("damage", [(truncate, "model.safetensors"), (flip_a_byte, "optimizer.pt")])
def test_resuming_skips_a_damaged_checkpoint_for_the_one_before(tmp_path, accelerator, caplog, damage):
    damage_file, name = damage
    good = save(tmp_path, 1, accelerator)
    bad = save(tmp_path, 2, accelerator)
    damage_file(bad / name)
    with caplog.at_level(logging.WARNING, logger="mlm_pretrain.checkpoint"):
        assert latest_checkpoint(tmp_path) == good
    assert f"skipping checkpoint {bad}" in caplog.text and str(bad / name) in caplog.text


def test_with_every_checkpoint_damaged_there_is_none_to_resume(tmp_path, accelerator, caplog):
    first, second = save(tmp_path, 1, accelerator), save(tmp_path, 2, accelerator)
    (first / "manifest.json").unlink()
    state = second / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 2', '"step": 3'))  # the same size, other bytes
    with caplog.at_level(logging.WARNING, logger="mlm_pretrain.checkpoint"):
        assert latest_checkpoint(tmp_path) is None
    assert str(first / "manifest.json") in caplog.text and "is missing" in caplog.text
    assert str(state) in caplog.text and "sha256" in caplog.text


@pytest.mark.parametrize(
    "name, damage",
    [
        ("model.safetensors", truncate),
        ("model.safetensors", lambda file: file.write_bytes(b"\xff" * 64)),
        ("optimizer.pt", truncate),
        ("rng-0.pt", lambda file: file.write_bytes(b"not a zip file")),
        ("data.json", lambda file: file.write_text('{"position": ')),
        ("trainer_state.json", lambda file: file.write_bytes(b"\xff\xfe")),
    ],
)
def test_loading_a_damaged_file_raises_input_error_naming_it(tmp_path, accelerator, name, damage):
    path = save(tmp_path, 1, accelerator)
    damage(path / name)
    model, optimizer = trained()
    with pytest.raises(InputError, match=f"cannot load {path / name} "):
        load_checkpoint(path, accelerator, model, optimizer)


def test_keep_last_keeps_the_newest_and_never_the_last_good_one_away(tmp_path, accelerator):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, accelerator, keep_last=2)
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-000003", "step-000004"]

    # a damaged newer one (the run resumed from step 3) does not push out the one just written
    truncate(tmp_path / "checkpoints" / "step-000004" / "model.safetensors")
    rewritten = save(tmp_path, 2, accelerator, keep_last=1)
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-000002", "step-000004"]
    assert latest_checkpoint(tmp_path) == rewritten


class FullDiskFile(io.FileIO):
    def write(self, data):
        raise OSError(errno.ENOSPC, NO_SPACE)


def raise_no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, NO_SPACE)


def safetensors_no_space(*args, **kwargs):
    raise SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error 28)")


@pytest.mark.parametrize(
    "target, replacement",
    [
        (torch, ("save", raise_no_space)),
        # as a real full disk does: the file under torch.save fails (torch may wrap it in a RuntimeError)
        (checkpoint, ("open", lambda path, mode: FullDiskFile(path, "w"))),
        (checkpoint, ("save_model", safetensors_no_space)),
    ],
    ids=["OSError", "torch.save", "safetensors"],
)
def test_a_full_disk_leaves_the_previous_checkpoint_as_it_was(
    tmp_path, accelerator, monkeypatch, target, replacement
):
    previous = save(tmp_path, 1, accelerator)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    monkeypatch.setattr(target, *replacement, raising=False)
    with pytest.raises(DiskFullError, match=rf"disk is full: writing .*step-000002 .*{SIZE}") as caught:
        save(tmp_path, 2, accelerator)
    assert str(tmp_path / "checkpoints" / "step-000002") in str(caught.value)
    assert "--resume" in str(caught.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert latest_checkpoint(tmp_path) == previous


def test_a_full_disk_at_the_first_checkpoint_quotes_the_estimate(tmp_path, accelerator, monkeypatch):
    monkeypatch.setattr(torch, "save", raise_no_space)
    needed = checkpoint_size_estimate(torch.nn.Linear(4, 3))
    assert needed == 12 * 15
    with pytest.raises(DiskFullError, match=f"it needs about {needed} bytes"):
        save(tmp_path, 1, accelerator)
    assert not list((tmp_path / "checkpoints").iterdir())


class OneOfTwoRanks:
    """This process as rank `rank` of two; at each stage of the protocol the other rank reports `other`
    (0 done, 1 failed, 2 disk full), as `torch.distributed.all_gather_object` would hand it over."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, rank: int, other: list[int]):
        self.process_index, self.is_main_process, self.other = rank, rank == 0, list(other)

    def unwrap_model(self, model):
        return model

    def all_gather_object(self, outcomes: list, outcome) -> None:
        code, them = self.other.pop(0), 1 - self.process_index
        theirs = [None, (them, False, "OSError: bad sector"), (them, True, f"OSError: {NO_SPACE}")][code]
        outcomes[self.process_index], outcomes[them] = outcome, theirs


@pytest.mark.parametrize(
    "rank, other, expected",
    [
        (0, [0, 2], DiskFullError),  # the other rank ran out of space writing its files
        (1, [0, 0, 0, 2], DiskFullError),  # the main process ran out of space writing the shared ones
        (1, [0, 0, 0, 0, 2], DiskFullError),  # ... or writing the manifest
        (0, [0, 1], checkpoint.WriteFailed),  # the other rank failed otherwise: every rank names it
    ],
)
def test_every_rank_learns_that_a_checkpoint_failed(tmp_path, monkeypatch, rank, other, expected):
    accelerator = OneOfTwoRanks(rank, other)
    monkeypatch.setattr(torch.distributed, "all_gather_object", accelerator.all_gather_object)
    partial = tmp_path / "checkpoints" / "step-000001.partial"
    if rank == 1:  # what the main process does before the first agreement
        partial.mkdir(parents=True)
    model, optimizer = trained()
    files = checkpoint.mlm_files(accelerator, model, optimizer, {})
    with pytest.raises(
        expected, match="disk is full" if expected is DiskFullError else "bad sector"
    ) as raised:
        checkpoint.write_atomically(tmp_path, 1, accelerator, files, {"step": 1}, keep_last=0)
    assert raised.value.rank == 1 - rank  # the rank where it failed, named on every rank
    assert not accelerator.other  # every stage up to the failure agreed, none after it
    assert not (tmp_path / "checkpoints" / "step-000001").exists()
    assert partial.exists() == (rank == 1)  # only the main process removes it


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from transformers import AutoModelForMaskedLM

    from mlm_pretrain.tokenizer import load_tokenizer

    return AutoModelForMaskedLM.from_pretrained(tiny_checkpoint), load_tokenizer(tiny_checkpoint)


def test_an_export_replaces_the_old_one_only_when_complete(tmp_path, hf_model, monkeypatch):
    """As `Run.export` writes one: the objective's files and the card in an `atomic_directory`."""
    from mlm_pretrain.objectives.mlm import SparseMLM
    from mlm_pretrain.parallel import full_state_dict

    model, tokenizer = hf_model
    objective = SparseMLM(model)
    final = tmp_path / "final"

    def export(card: str) -> None:
        with atomic_directory(final) as partial:
            objective.export(partial, full_state_dict(objective), tokenizer)
            (partial / "README.md").write_text(card)

    export("first card")
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= set(before)

    monkeypatch.setattr(model, "save_pretrained", safetensors_no_space)
    with pytest.raises(DiskFullError, match=rf"disk is full: writing {final} .*{SIZE}"):
        export("second card")
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]

    monkeypatch.undo()
    export("second card")
    assert (final / "README.md").read_text() == "second card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_an_atomic_directory_that_fails_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="half way"), atomic_directory(tmp_path / "out") as partial:
        (partial / "a.txt").write_text("a")
        raise ValueError("half way")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("leftover", ["out.partial", "out.old"])
def test_an_atomic_directory_reports_what_it_did_not_create_and_deletes_none_of_it(tmp_path, leftover):
    (tmp_path / leftover).mkdir()
    (tmp_path / leftover / "weights.bin").write_bytes(b"someone's")
    refused = pytest.raises(InputError, match=rf"{leftover} exists: .*remove it.* and try again")
    with refused, atomic_directory(tmp_path / "out") as partial:
        (partial / "a.txt").write_text("a")
    assert (tmp_path / leftover / "weights.bin").read_bytes() == b"someone's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [leftover]


def test_a_checkpoint_another_user_could_have_written_is_never_resumed(tmp_path, accelerator, monkeypatch):
    from mlm_pretrain.checkpoint import CheckpointFiles, write_atomically

    files = CheckpointFiles(lambda partial, rank: (partial / f"word2vec-{rank}.pt").write_bytes(b"tables"))
    step = write_atomically(tmp_path, 1, accelerator, files, {"step": 1}, keep_last=0)
    for path in (tmp_path / "checkpoints", step, *step.iterdir()):  # whatever the umask made of them
        path.chmod(path.stat().st_mode & ~0o022)
    assert latest_checkpoint(tmp_path) == step
    for path, bits in ((step / "word2vec-0.pt", 0o020), (step, 0o002), (tmp_path / "checkpoints", 0o020)):
        path.chmod(path.stat().st_mode | bits)
        with pytest.raises(InputError, match=rf"{path} is writable by .* runs .*code .*chmod -R go-w "):
            latest_checkpoint(tmp_path)
        path.chmod(path.stat().st_mode & ~bits)
    monkeypatch.setattr(checkpoint.os, "getuid", lambda: os.stat(step).st_uid + 1)
    with pytest.raises(InputError, match=rf"{tmp_path / 'checkpoints'} is owned by uid \d+, not this user"):
        latest_checkpoint(tmp_path)


def test_a_low_disk_is_warned_of_before_the_run(tmp_path, accelerator, monkeypatch, caplog):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with caplog.at_level(logging.WARNING, logger="mlm_pretrain.checkpoint"):
        assert not warn_if_disk_low(tmp_path, bytes_per_checkpoint=500)
        assert warn_if_disk_low(tmp_path, bytes_per_checkpoint=501)
    assert f"only 1.0 KB free on the disk of {tmp_path}" in caplog.text
    save(tmp_path, 1, accelerator)  # a few KB: the real size counts, not the estimate
    assert warn_if_disk_low(tmp_path, bytes_per_checkpoint=1)


def test_metrics_are_strict_json_with_null_for_nan_and_inf(tmp_path, accelerator):
    run_log = RunLog(tmp_path, accelerator, {})
    run_log.log(1, loss=2.5, lr=0.1)
    run_log.log(2, loss=math.nan, lr=0.1, grad_norm=math.inf)

    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=reject) for line in lines]
    assert [r["loss"] for r in records] == [2.5, None] and records[1]["grad_norm"] is None
    assert plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")


def test_a_full_disk_while_logging_leaves_no_half_line(tmp_path, accelerator, monkeypatch):
    run_log = RunLog(tmp_path, accelerator, {})
    run_log.log(1, loss=2.5)
    metrics = tmp_path / "metrics.jsonl"
    kept = metrics.read_text()
    real_open = Path.open

    class HalfWritten:
        def __init__(self, path, mode):
            self.file = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            self.file.write(text[: len(text) // 2])
            self.file.flush()
            raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(Path, "open", lambda path, mode="r": HalfWritten(path, mode))
    with pytest.raises(DiskFullError, match=f"disk is full: writing {metrics} "):
        run_log.log(2, loss=2.0)
    monkeypatch.undo()
    assert metrics.read_text() == kept


def test_resuming_the_log_drops_what_came_after_the_checkpoint_and_a_torn_line(tmp_path, accelerator, caplog):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "loss": 1.0}\n{"st')
    with caplog.at_level(logging.WARNING, logger="mlm_pretrain.run_log"):
        RunLog(tmp_path, accelerator, {}, resumed_step=2)
    assert metrics.read_text() == '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n'
    assert f"{metrics} line 4 is not a JSON record" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_checkpoint_written_under_a_loose_umask_is_still_resumable(tmp_path, accelerator):
    previous = os.umask(0o002)
    try:
        path = save(tmp_path, 1, accelerator)
    finally:
        os.umask(previous)
    checkpoint.check_trusted(path)  # nothing group-writable is left for resuming to refuse
    assert latest_checkpoint(tmp_path) == path


def test_a_run_that_holds_its_directory_clears_a_crashed_exports_leftovers(tmp_path):
    final = tmp_path / "final"
    (tmp_path / "final.partial").mkdir()  # a crash while writing the export
    (tmp_path / "final.old").mkdir()  # ... after moving the export before it aside
    (tmp_path / "final.old" / "README.md").write_text("the export before")
    with atomic_directory(final, locked=True) as partial:
        assert (tmp_path / "final").is_dir()  # the export before is back until the new one replaces it
        (partial / "README.md").write_text("the new export")
    assert (final / "README.md").read_text() == "the new export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
