"""The run directory's lock: what `hold_run_dir` refuses."""

import os
import subprocess
import sys

import pytest

from mlm_pretrain.errors import InputError
from mlm_pretrain.run_dir import LOCK, hold_run_dir


def test_a_symlinked_lock_is_refused_and_its_target_left_alone(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("not a lock\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK).symlink_to(target)
    with pytest.raises(InputError, match=rf"{LOCK} is a symbolic link.*remove it"):
        hold_run_dir(run_dir)
    assert target.read_text() == "not a lock\n" and (run_dir / LOCK).is_symlink()


def hold_in_another_process(run_dir):
    """A process holding `run_dir` as a pretraining job does, until it is killed."""
    code = (
        "import sys, time\n"
        "from mlm_pretrain.run_dir import hold_run_dir\n"
        "hold_run_dir(sys.argv[1])\n"
        "print('held', flush=True)\n"
        "time.sleep(300)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_the_lock_is_held_against_another_process_and_names_it(tmp_path):
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(InputError, match=rf"is in use by pid {holder.pid} on "):
            hold_run_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    hold_run_dir(tmp_path)  # the kernel released it with the process
    assert os.path.isfile(tmp_path / LOCK)
