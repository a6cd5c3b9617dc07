"""Make `accelerate launch --cpu --num_processes N` start N processes.

accelerate 1.x starts CPU jobs with its simple launcher, which runs one process unless it is given an
MPI hostfile: `--num_processes 2 --cpu` then trains in one process that believes it is alone. When we
are that process (accelerate asked for several, so it set MASTER_ADDR, but no launcher set WORLD_SIZE),
we start the N processes ourselves with torch's own launcher, which sets up gloo as usual.
`accelerate launch --multi_gpu --num_processes N` (no --cpu) already fans out, on CPU too.
"""

from __future__ import annotations

import os
import socket
import sys


def requested_cpu_processes() -> int:
    """The --num_processes given to the `accelerate launch --cpu` that started us, or 1."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true") or "WORLD_SIZE" in os.environ:
        return 1
    if "MASTER_ADDR" not in os.environ:  # accelerate sets it only when asked for more than one process
        return 1
    import psutil

    argv = psutil.Process(os.getppid()).cmdline()
    for i, arg in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(argv):
                return int(argv[i + 1])
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
    return 1


def relaunch(processes: int) -> int:
    """Run this same command line in `processes` processes under torch.distributed.run; its exit code."""
    import subprocess

    with socket.socket() as s:  # a free port, so two jobs on one machine don't collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        f"--master_port={port}",
        "-m",
        "mlm_pretrain",
        *sys.argv[1:],
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return subprocess.call(cmd, env=env)
