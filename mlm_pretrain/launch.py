"""One process group from whatever launched us, and the device each process trains on.

Every standard launcher sets the same environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
`MASTER_PORT`): `torchrun` (single- and multi-node, SLURM's `srun torchrun`), `accelerate launch
--multi_gpu` and, through the relaunch below, `accelerate launch --cpu`. `start_accelerator` builds
the `Accelerator` from it: NCCL on CUDA, gloo on CPU (accelerate forms a CPU group only when told the
run is on the CPU, so we tell it when no accelerator is present).

accelerate 1.x starts CPU jobs (`--cpu`, or a saved config with `distributed_type: MULTI_CPU`) with
its simple launcher, which runs ONE process unless it is given an MPI hostfile: it sets MASTER_ADDR
but no WORLD_SIZE, and the process believes it is alone. When we are that process we read the
accelerate command that started us with accelerate's own parser (flags and config file alike) and
start the processes it asked for with torch's launcher.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

# How long a collective waits for a rank that neither arrives nor fails. An error on any rank ends every
# rank within seconds (`failures`); this is the backstop for a rank that hangs without one (a stuck
# filesystem, a host gone with its sockets open). It must outlast what a healthy rank can make the
# others wait for: the main process alone writing a checkpoint or an export of a large model to a slow
# disk, a first batch of a large shuffle buffer. One value for every backend (torch's own defaults are 10
# minutes for NCCL, 30 for gloo).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass
class Launch:
    """What a relaunch needs: the shape of the job and where rank 0 listens."""

    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str
    master_port: int | None


def resolve_precision(setting: str, device_type: str) -> str:
    """`impl.mixed_precision` as this machine should run it: "auto" is bf16 where the hardware computes
    in bf16 (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX) and fp32 elsewhere: on an AVX2
    CPU, bf16 autocast is emulated and was >10x slower than fp32 for the cram model (bench/RESULTS.md)."""
    if setting != "auto":
        return setting
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    if device_type == "cpu":
        native = (
            getattr(torch.cpu, "_is_avx512_bf16_supported", bool)()
            or getattr(torch.cpu, "_is_amx_tile_supported", bool)()
        )
        return "bf16" if native else "no"
    return "no"


def start_accelerator(
    run_dir: Path,
    *,
    mixed_precision: str = "no",
    cpu: bool | None = None,
    log_with: Sequence[str] = (),
):
    """The `Accelerator` of this process, in the one process group every launcher's environment
    describes. `cpu=None` trains on the accelerator if there is one; word2vec, whose tables live in
    host memory, passes `cpu=True` so that its collectives run over gloo on GPU machines too.
    `mixed_precision` is "no", "bf16" or "auto" (`resolve_precision`).
    `log_with` names the trackers (`impl.log_with`); a missing tracker package is an InputError here,
    before the run starts."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from mlm_pretrain.run_log import trackers

    if cpu is None:
        cpu = not torch.accelerator.is_available() or _asked_for_cpu()
    device_type = "cpu" if cpu else torch.accelerator.current_accelerator().type
    return Accelerator(
        cpu=cpu,
        mixed_precision=resolve_precision(mixed_precision, device_type),
        project_dir=run_dir,
        log_with=trackers(log_with, run_dir),
        # DDP's gradients live in its all-reduce buckets instead of in a second copy beside them (for
        # bert-base the buckets were 375 MiB per process: bench/bench_memory.py, measured before this)
        kwargs_handlers=[
            DistributedDataParallelKwargs(gradient_as_bucket_view=True),
            InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT),
        ],
    )


def accelerate_cpu_launch() -> Launch | None:
    """The job that the `accelerate launch` which started us asked for, when its simple launcher ran
    only us in place of several processes; None when we are part of a proper process group."""
    if "WORLD_SIZE" in os.environ or "MASTER_ADDR" not in os.environ:
        return None  # a launcher formed the group, or accelerate asked for one process (no MASTER_ADDR)
    if not _asked_for_cpu():
        return None
    import psutil
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = psutil.Process(os.getppid()).cmdline()
    if "launch" not in argv:
        return None
    args = launch_command_parser().parse_args(argv[argv.index("launch") + 1 :])
    args, _, _ = _validate_launch_command(args)  # fills in what the config file says
    machines = args.num_machines or 1
    processes = args.num_processes or 1
    if processes % machines:
        raise ValueError(f"accelerate: --num_processes {processes} is not a multiple of {machines} machines")
    if processes == 1:
        return None
    return Launch(
        nnodes=machines,
        node_rank=args.machine_rank or 0,
        nproc_per_node=processes // machines,
        master_addr=os.environ["MASTER_ADDR"],
        master_port=args.main_process_port,
    )


def relaunch(launch: Launch) -> int:
    """Run this same command line as `launch` says under torch.distributed.run; its exit code."""
    import subprocess

    port = launch.master_port
    if port is None:  # one machine: a free port, so two jobs on one machine don't collide
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={launch.nnodes}",
        f"--node_rank={launch.node_rank}",
        f"--nproc_per_node={launch.nproc_per_node}",
        f"--master_addr={launch.master_addr}",
        f"--master_port={port}",
        "-m",
        "mlm_pretrain",
        *sys.argv[1:],
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc_per_node)))
    return subprocess.call(cmd, env=env)


def _asked_for_cpu() -> bool:
    """`accelerate launch --cpu` (or a config with `use_cpu: true`) said so."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")


def threads_per_process() -> int:
    """CPU threads for each process on this machine: the cores shared by the processes on this node."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    return max(1, (os.cpu_count() or 1) // local)
