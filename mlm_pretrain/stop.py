"""Stopping a run at a step boundary with a checkpoint: Ctrl-C, and the preemption signals of clusters.

Ctrl-C (SIGINT), SIGTERM (what `torchrun`, Kubernetes and `scancel` send) and SIGUSR1 (SLURM's
`--signal=USR1@120` warning before a preemption or the time limit) ask the loop to finish its step,
write a checkpoint and stop. A second Ctrl-C stops at once; a repeated SIGTERM or SIGUSR1 does not,
since a scheduler's signal often arrives twice (SLURM signals every process of a step, and torchrun
forwards what it gets to its workers too). With several processes they agree on the step to stop at
(one tiny all-reduce per step), so every rank saves the same step.

A run stopped by SIGTERM or SIGUSR1 exits with `PREEMPTED_EXIT` (75, EX_TEMPFAIL: "try again"), which a
job script tests to requeue the same command with `--resume`; Ctrl-C exits with 130 as shells expect.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75
NONE, INTERRUPTED, PREEMPTED = 0, 1, 2  # ordered: when ranks disagree, a preemption wins


class Preempted(Exception):
    """The run stopped on a preemption signal after saving a checkpoint; rerun with --resume."""


class StopRequest:
    """Within `with StopRequest() as stop:`, the signals above set a request the loop polls with
    `stop.requested(accelerator)` once per step."""

    SIGNALS = {signal.SIGINT: INTERRUPTED, signal.SIGTERM: PREEMPTED, signal.SIGUSR1: PREEMPTED}

    def __enter__(self) -> StopRequest:
        self._asked = NONE
        self._previous = {sig: signal.signal(sig, self._ask) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _ask(self, signum, frame) -> None:
        asked = self.SIGNALS[signal.Signals(signum)]
        if self._asked and asked == INTERRUPTED:
            raise KeyboardInterrupt
        if not self._asked:
            hint = " (Ctrl-C again to stop at once)" if asked == INTERRUPTED else ""
            log.warning("%s: stopping after this step%s", signal.Signals(signum).name, hint)
        self._asked = max(self._asked, asked)

    def requested(self, accelerator) -> int:
        """NONE, INTERRUPTED or PREEMPTED, the same on every process."""
        if accelerator.num_processes == 1:
            return self._asked
        import torch  # here: the CLI imports this module, and its --help must stay fast

        asked = torch.tensor(float(self._asked), device=accelerator.device)
        return int(accelerator.reduce(asked, "max"))

    @staticmethod
    def stop(request: int, step: int, run_dir) -> None:
        """Raise what ends the run for `request`, once its checkpoint is saved."""
        log.warning("stopped at step %d, saved in %s; continue with --resume", step, run_dir)
        if request == PREEMPTED:
            raise Preempted(f"preempted at step {step}; checkpoint saved in {run_dir}")
        raise KeyboardInterrupt
