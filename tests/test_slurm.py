"""examples/slurm-pretrain.sbatch decides by the training step's exit code: 0 done, 75 requeue (a bounded
number of times), anything else fail. There is no SLURM here: the script runs under bash with stand-ins
for `srun` (the step's tasks, here, each in its own process group), `scancel` (a signal to those
groups) and `scontrol` (a host list; requeues are recorded), and, but for the last test, a stand-in
trainer that keeps mlm-pretrain's contract (README, "Reliability"): after SIGUSR1 or SIGTERM in its
training loop it checkpoints and exits 75; after the loop it lets the export finish; in its first
seconds, before it listens for them, the signal's default action kills it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "slurm-pretrain.sbatch"
JOB_ID = "4242"

SRUN = """#!/bin/bash
# srun: the step's SLURM_NTASKS tasks, each in its own process group (the processes a signal to the job
# step reaches); its exit code is the highest of theirs, as srun's is
pids=()
for ((i = 0; i < ${SLURM_NTASKS:-1}; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i setsid "$@" &
    pids+=("$!")
    echo "$!" >> "$STANDIN_DIR/step.pids"
done
highest=0
for pid in "${pids[@]}"; do
    wait "$pid"
    code=$?
    if [ "$code" -gt "$highest" ]; then highest=$code; fi
done
exit "$highest"
"""
SCANCEL = """#!/bin/bash
# scancel --signal=SIG JOB: SIG to every process of the job's steps, not to the batch script
echo "scancel $*" >> "$STANDIN_DIR/calls"
while read -r group; do kill -s "${1#--signal=}" -- "-$group" 2>/dev/null; done < "$STANDIN_DIR/step.pids"
"""
SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STANDIN_DIR/calls"
if [ "$1" = show ]; then printf '%s\n' ${STANDIN_HOSTS:-node1 node2}; fi
"""
TRAINER = f"""#!{sys.executable}
# mlm-pretrain's contract on signals. STANDIN_END: what it does when it runs to its end (finish: write
# final/ and exit 0; final-then-fail: write final/, exit 1; stopped: exit 75 at once). STANDIN_PHASE:
# where a signal finds it (startup: not listening yet; loop; export: listening, not acting on it), where
# it waits STANDIN_SECONDS (none: it does not wait); STANDIN_STOP_EXIT: its exit after a stop in the loop
import json, os, signal, sys, time
from pathlib import Path

out = Path(sys.argv[sys.argv.index("--out") + 1])
standins = Path(os.environ["STANDIN_DIR"])
rank = os.environ["RANK"]
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
record = {{"argv": sys.argv[1:], **{{key: os.environ.get(key) for key in keys}}}}
(standins / f"trainer-{{rank}}.json").write_text(json.dumps(record))
end, phase = os.environ["STANDIN_END"], os.environ.get("STANDIN_PHASE")
if end == "stopped":
    sys.exit(75)
stop = []
if phase in ("loop", "export"):
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.append(phase))
(standins / f"ready-{{rank}}").touch()
deadline = time.time() + (float(os.environ.get("STANDIN_SECONDS", "8")) if phase else 0)
while "loop" not in stop and time.time() < deadline:
    time.sleep(0.02)
if "loop" in stop:
    sys.exit(int(os.environ.get("STANDIN_STOP_EXIT", "75")))
if rank == "0":  # the main process exports
    (out / "final").mkdir(parents=True)
sys.exit(1 if end == "final-then-fail" else 0)
"""


class Job:
    """One run of the batch script, as SLURM would start it, in `cwd` (the directory sbatch ran in),
    with its stand-ins in `cwd / standins`."""

    def __init__(self, cwd: Path, env: dict[str, str], trainer: str = TRAINER, standins: str = "standins"):
        self.dir = cwd / standins
        self.dir.mkdir()
        standins = {"srun": SRUN, "scancel": SCANCEL, "scontrol": SCONTROL, "mlm-pretrain": trainer}
        for name, text in standins.items():
            (self.dir / name).write_text(text)
            (self.dir / name).chmod(0o755)
        (self.dir / "step.pids").touch()
        environment = {
            **os.environ,
            "PATH": f"{self.dir}{os.pathsep}{os.environ['PATH']}",
            "STANDIN_DIR": str(self.dir),
            "SLURM_JOB_ID": JOB_ID,
            "SLURM_JOB_NAME": "tiny",
            "SLURM_JOB_NODELIST": "node[1-2]",
            "SLURM_NNODES": "1",
            "SLURM_NTASKS": "1",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_CPUS_PER_TASK": "1",
            **env,
        }
        self.process = subprocess.Popen(
            ["bash", str(SCRIPT)],
            cwd=cwd,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def signal_when_ready(self, signum: int, step_too: bool = False, ranks: int = 1) -> None:
        """`signum` to the batch script once every task is running, as SLURM's `--signal=B:USR1` does;
        with `step_too`, to the step's processes as well, as scancel and a preemption do."""
        deadline = time.time() + 60
        while len(list(self.dir.glob("ready-*"))) < ranks:
            assert time.time() < deadline and self.process.poll() is None, self.finish()
            time.sleep(0.02)
        self.process.send_signal(signum)
        if step_too:
            for group in self.dir.joinpath("step.pids").read_text().split():
                os.killpg(int(group), signum)

    def finish(self, timeout: float = 60) -> int:
        """The script's exit code; on a timeout, it and the step's processes are killed."""
        try:
            self.output, _ = self.process.communicate(timeout=timeout)
        finally:
            if self.process.poll() is None:
                for group in [self.process.pid, *map(int, (self.dir / "step.pids").read_text().split())]:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(group, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode

    def calls(self) -> list[str]:
        calls = self.dir / "calls"
        return calls.read_text().splitlines() if calls.exists() else []

    def requeued(self) -> bool:
        return f"scontrol requeue {JOB_ID}" in self.calls()

    def trainer(self, rank: int = 0) -> dict:
        return json.loads((self.dir / f"trainer-{rank}.json").read_text())


def test_a_finished_run_ends_the_job_and_every_task_is_a_rank_of_one_group(tmp_path):
    job = Job(tmp_path, {"STANDIN_END": "finish", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"})
    assert job.finish() == 0, job.output
    assert not job.requeued() and (tmp_path / "runs" / "tiny" / "final").is_dir()
    ranks = [job.trainer(rank) for rank in (0, 1)]
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"]) for r in ranks] == [
        ("0", "0", "2", "2"),
        ("1", "1", "2", "2"),
    ]
    assert {r["MASTER_ADDR"] for r in ranks} == {"node1"}  # the allocation's first node
    assert len({r["MASTER_PORT"] for r in ranks}) == 1
    assert ranks[0]["argv"] == [
        *("pretrain", "--recipe", "recipes/bert-base.yaml", "--out", "runs/tiny", "--resume")
    ]


def test_a_step_that_failed_after_writing_final_fails_the_job(tmp_path):
    job = Job(tmp_path, {"STANDIN_END": "final-then-fail"})
    assert job.finish() == 1, job.output
    assert not job.requeued()
    assert "failed (exit 1)" in job.output


def test_a_run_stopped_for_requeue_is_requeued(tmp_path):
    job = Job(tmp_path, {"STANDIN_END": "stopped", "SLURM_RESTART_COUNT": "3"})
    assert job.finish() == 0, job.output
    assert job.requeued()


@pytest.mark.parametrize(("restarts", "cap"), [("10", None), ("3", "3")])
def test_requeues_stop_at_max_requeues(tmp_path, restarts, cap):
    env = {"STANDIN_END": "stopped", "SLURM_RESTART_COUNT": restarts} | ({"MAX_REQUEUES": cap} if cap else {})
    job = Job(tmp_path, env)
    assert job.finish() == 75, job.output
    assert not job.requeued()
    assert f"requeued {restarts} times already" in job.output


def test_the_time_limit_warning_reaches_the_loop_and_the_job_is_requeued(tmp_path):
    job = Job(tmp_path, {"STANDIN_END": "finish", "STANDIN_PHASE": "loop"})
    job.signal_when_ready(signal.SIGUSR1)
    assert job.finish() == 0, job.output
    assert f"scancel --signal=USR1 {JOB_ID}" in job.calls()
    assert job.requeued() and not (tmp_path / "runs" / "tiny" / "final").exists()


def test_a_failure_after_the_warning_is_not_requeued(tmp_path):
    # the checkpoint at the stop fails (a full disk, say): exit 2, and requeueing would only repeat it
    job = Job(tmp_path, {"STANDIN_END": "finish", "STANDIN_PHASE": "loop", "STANDIN_STOP_EXIT": "2"})
    job.signal_when_ready(signal.SIGUSR1)
    assert job.finish() == 2, job.output
    assert not job.requeued()


def test_a_warning_before_the_trainer_listens_still_requeues(tmp_path):
    # the process dies of the signal, having written nothing: the job is requeued at once, instead of
    # running on into its time limit
    job = Job(tmp_path, {"STANDIN_END": "finish", "STANDIN_PHASE": "startup", "STANDIN_SECONDS": "30"})
    started = time.time()
    job.signal_when_ready(signal.SIGUSR1)
    assert job.finish() == 0, job.output
    assert job.requeued() and time.time() - started < 20
    assert "SIGUSR1 came before it listened for it" in job.output


def test_a_warning_during_the_final_export_lets_the_job_finish(tmp_path):
    job = Job(tmp_path, {"STANDIN_END": "finish", "STANDIN_PHASE": "export", "STANDIN_SECONDS": "2"})
    job.signal_when_ready(signal.SIGUSR1)
    assert job.finish() == 0, job.output
    assert not job.requeued() and (tmp_path / "runs" / "tiny" / "final").is_dir()


def test_scancel_or_a_preemption_stops_at_a_checkpoint_and_is_not_requeued_by_the_script(tmp_path):
    job = Job(tmp_path, {"STANDIN_END": "finish", "STANDIN_PHASE": "loop"})
    job.signal_when_ready(signal.SIGTERM, step_too=True)
    assert job.finish() == 75, job.output
    assert not job.requeued()


@pytest.mark.slow
def test_the_real_trainer_is_stopped_requeued_and_resumed_to_the_end(tmp_path):
    """The script around a real tiny run: the warning at start-up, then in the loop (a checkpoint, exit
    75), each requeued; the third job resumes and finishes."""
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    recipe["data"]["tokenizer"] = str(ROOT / "tokenizers" / "default-wordpiece-8k")
    recipe["data"].update(seq_len=32)
    recipe["model"].update(hidden_size=32, intermediate_size=64)
    recipe["optim"].update(batch_size=8, micro_batch_size=8)
    recipe["max_steps"] = 100
    recipe["impl"].update(eval_blocks=16, eval_every=1000, save_every=1000, log_every=1, progress=False)
    recipe["impl"]["log_with"] = []
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    trainer = f'#!/bin/bash\nexec {sys.executable} -m mlm_pretrain "$@"\n'
    run_dir = tmp_path / "runs" / "tiny"

    def job(restarts: int) -> Job:
        env = {
            **{"RECIPE": "tiny.yaml", "SLURM_RESTART_COUNT": str(restarts), "STANDIN_HOSTS": "127.0.0.1"},
            **{"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        }
        return Job(tmp_path, env, trainer=trainer, standins=f"standins-{restarts}")

    first = job(0)  # the warning while the model is built: the process dies of it, the job requeues
    deadline = time.time() + 60
    while not (first.dir / "step.pids").read_text().strip() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # the task's bash has its traps; Python is still importing torch
    first.process.send_signal(signal.SIGUSR1)
    assert first.finish(timeout=300) == 0, first.output
    assert first.requeued() and not (run_dir / "checkpoints").exists()
    assert "SIGUSR1 came before it listened for it" in first.output

    second = job(1)  # the warning in the loop: a checkpoint at the step it came, exit 75, requeued
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 20) and time.time() < deadline:
        time.sleep(0.05)
    second.process.send_signal(signal.SIGUSR1)
    assert second.finish(timeout=300) == 0, second.output
    assert second.requeued()
    (saved,) = (run_dir / "checkpoints").iterdir()
    assert 20 <= int(saved.name.removeprefix("step-")) < 100

    third = job(2)
    assert third.finish(timeout=600) == 0, third.output
    assert not third.requeued() and (run_dir / "final" / "model.safetensors").is_file()
