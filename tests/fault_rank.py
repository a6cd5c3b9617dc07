"""One rank of a multi-process run with a fault injected on one rank: the tests start each rank with
`python tests/fault_rank.py FAULT RANK pretrain ...` and the process-group environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as a launcher would, so that each rank's exit code is seen.

Faults (on rank RANK only): `rng` its RNG file of a checkpoint cannot be written; `dcp` the disk fills
while DCP writes its shards; `step` the fourth step raises; `hang` the same, and the process stays
alive after its main thread ends (a non-daemon thread); `none` nothing (the test breaks a file)."""

import errno
import os
import sys
import threading
import time

from mlm_pretrain import checkpoint, trainer
from mlm_pretrain.cli import main

fault, fault_rank = sys.argv[1], int(sys.argv[2])
here = int(os.environ["RANK"]) == fault_rank

if here and fault == "rng":
    write = checkpoint.torch_save

    def torch_save(obj, path):
        if path.name.startswith("rng-"):
            raise OSError(errno.EIO, "injected: the RNG file could not be written")
        return write(obj, path)

    checkpoint.torch_save = torch_save
elif here and fault == "dcp":
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    def write_data(self, plan, planner):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    FileSystemWriter.write_data = write_data
elif here and fault in ("step", "hang"):
    step = trainer.forward_backward
    calls = []

    def forward_backward(*args):
        calls.append(None)
        if len(calls) == 4:
            if fault == "hang":
                threading.Thread(target=time.sleep, args=(3600,)).start()
            raise RuntimeError("injected: the step failed")
        return step(*args)

    trainer.forward_backward = forward_backward

sys.exit(main(sys.argv[3:]))
