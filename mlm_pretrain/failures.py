"""Errors that every process of a run agrees on: one failing rank ends them all, promptly, as one.

Without this, a rank that raises leaves the others inside a collective: on gloo they learn of it as
"Connection closed by peer" once its process is gone, and not at all while it lives on (a rank stuck in
clean-up, or one that skipped a collective the others entered), where they wait for the collective
timeout. So the first rank to fail posts a record in the process group's key-value store (the
rendezvous store every launcher starts): which process, what failed, the exit code. Every rank runs a
watchdog thread that polls the store; when a record appears it gives the rank's own unwinding
`GRACE_SECONDS`, then prints the record and ends the process with its exit code. A rank that unwinds in
time (gloo raised in it) reports the record instead of its own, secondary error. Either way every rank
prints the same line and exits with the same code; what a failing rank was writing is removed by the
writer's own clean-up (`checkpoint.write_atomically`, `atomic_directory`), which runs before the record
is posted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from mlm_pretrain.errors import InputError

log = logging.getLogger(__name__)

KEY = "mlm_pretrain/failed"
READ_KEY = "mlm_pretrain/failure_read"  # how many ranks have read the record
POLL_SECONDS = 0.5
GRACE_SECONDS = 5.0  # for a rank to unwind by itself before its watchdog ends it
EXIT_INPUT, EXIT_ERROR, EXIT_INTERRUPTED = 2, 1, 130


@dataclass
class Failure:
    rank: int
    message: str
    exit_code: int

    def line(self) -> str:
        return f"process {self.rank} failed: {self.message}"


class RunFailed(Exception):
    """A run ended by a failure (on this rank or another); `failure` is what every rank reports."""

    def __init__(self, failure: Failure):
        super().__init__(failure.line())
        self.failure = failure


def exit_code_of(error: BaseException) -> int:
    """The exit status the CLI gives `error`: 2 for the user's input, 130 for Ctrl-C, else 1."""
    from mlm_pretrain.stop import PREEMPTED_EXIT, Preempted

    if isinstance(error, InputError):
        return EXIT_INPUT
    if isinstance(error, Preempted):
        return PREEMPTED_EXIT
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_ERROR


def describe(error: BaseException, run_dir: Path, rank: int) -> str:
    """One line for `error`. An error of ours already reads as a sentence; anything else (a bug, a
    library's error) is named by type, and its traceback goes to a file in the run directory instead of
    the terminal, so that the one line stays the message."""
    if isinstance(error, InputError):
        return str(error)
    text = f"{type(error).__name__}: {error}"
    try:
        saved = Path(run_dir) / f"error-rank{rank}.log"
        saved.write_text("".join(traceback.format_exception(error)))
        text += f" (traceback in {saved})"
    except OSError:
        pass
    return text


class FailureAgreement:
    """The watchdog and the record of one process's run. With one process it only describes errors."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self._store = None
        self._seen: Failure | None = None  # the record as this rank last read it
        self._reported = threading.Event()  # this rank's main thread reports the failure itself
        self._done = threading.Event()
        if world_size > 1:
            import torch.distributed as dist

            self._store = dist.distributed_c10d._get_default_store()
            threading.Thread(target=self._watch, name="failure-watchdog", daemon=True).start()

    def fail(self, error: BaseException, run_dir: Path) -> RunFailed:
        """What this rank raises after `error` (and reports): the first failure of the run, whichever
        rank had it. The rank that posts it waits (`GRACE_SECONDS` at most) until every rank has read
        it: the store may live in this process, and go with it."""
        # an error every rank raised together (a checkpoint stage) names the rank where it began
        origin = getattr(error, "rank", self.rank)
        own = Failure(origin, describe(error, run_dir, self.rank), exit_code_of(error))
        self._reported.set()
        if self._store is None:
            return RunFailed(own)
        posted = self._post(own)
        if posted == own:
            self._wait_for_readers()
        return RunFailed(posted)

    def close(self) -> None:
        self._done.set()

    def _post(self, failure: Failure) -> Failure:
        """Post `failure` unless another rank posted first; the posted one either way."""
        record = json.dumps(vars(failure))
        try:
            # compare_set writes only where the key is absent (expected ""), and returns what is there
            return Failure(**json.loads(self._store.compare_set(KEY, "", record)))
        except Exception:  # the store went with the process hosting it: the record read before, if any
            return self._seen or failure

    def _wait_for_readers(self) -> None:
        deadline = time.monotonic() + GRACE_SECONDS
        while time.monotonic() < deadline:
            try:
                if int(self._store.add(READ_KEY, 0)) >= self.world_size:
                    return
            except Exception:
                return
            time.sleep(POLL_SECONDS / 5)

    def _read(self) -> Failure | None:
        try:
            if self._store.check([KEY]):
                return Failure(**json.loads(self._store.get(KEY)))
        except Exception:
            return None
        return None

    def _watch(self) -> None:
        while not self._done.wait(POLL_SECONDS):
            failure = self._read()
            if failure is None:
                continue
            self._seen = failure
            with contextlib.suppress(Exception):  # the store went with its host: nobody waits then
                self._store.add(READ_KEY, 1)
            # the rank may be unwinding by itself (gloo raised in it): let it report and exit normally
            if not self._done.wait(GRACE_SECONDS * (3 if self._reported.is_set() else 1)):
                if not self._reported.is_set():
                    print(
                        f"mlm-pretrain: error: {failure.line()}; every process stopped",
                        file=sys.stderr,
                        flush=True,
                    )
                os._exit(failure.exit_code)
            return
