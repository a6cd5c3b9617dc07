"""The one run every objective trains in: what a pretraining job does besides its objective's step.

`with Run(recipe) as run:` starts the process group (any launcher, a collective timeout of ours),
takes the run directory, makes the resume decision once (the main process chooses, every rank loads
the same checkpoint), records the recipe and listens for stop signals; leaving the block closes the
trackers and the process group on every path, and turns an error on any rank into one `RunFailed` that
every rank reports (`failures`). Inside, the objective's loop calls:

- `run.begin(vocab_size, ...)`: the run log, trackers and progress bar; the counters of the checkpoint
  resumed;
- `run.finished()` / `run.progress()`: the stop rules (`max_steps`, `max_tokens`, `max_minutes`; the
  first reached stops, the schedule follows the furthest along), the same on every rank;
- `run.step_done(tokens)`, `run.due(every)`, `run.log(...)`;
- `run.end_step(files)`: a checkpoint on the `save_every` cadence, at the end and on a stop signal
  (then it raises what stops the run: `Preempted`, exit 75, or KeyboardInterrupt), pushes on cadence;
- `run.finish(metrics, write_export)`: the final metrics, `final/` with the model card, the last push.

An objective supplies what differs: its state (`checkpoint.CheckpointFiles`), one step, its
evaluation and the files of its export.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mlm_pretrain.checkpoint import CheckpointFiles
from mlm_pretrain.errors import InputError
from mlm_pretrain.failures import FailureAgreement

log = logging.getLogger(__name__)


class Run:
    """One pretraining job: its process group, run directory, counters, stop rules, checkpoints, log
    and export (the module's docstring shows the calls an objective's loop makes)."""

    def __init__(self, recipe, *, cpu: bool | None = None):
        """`cpu=True` keeps the process group on gloo on GPU machines too (word2vec's tables live in
        host memory)."""
        self.recipe, self.impl, self._cpu = recipe, recipe.impl, cpu
        self.run_dir = Path(recipe.impl.out)
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.checkpoint: Path | None = None  # the checkpoint this run resumes from
        self._stopping = 0
        self._saved_step: int | None = None
        self._log = self._bar = None

    # -- set-up and tear-down --------------------------------------------------------------------

    def __enter__(self) -> Run:
        from mlm_pretrain.launch import start_accelerator, threads_per_process
        from mlm_pretrain.run_dir import hold_run_dir, write_recipe
        from mlm_pretrain.stop import StopRequest

        self._started = time.perf_counter()  # a minutes budget is the user's clock: set-up included
        # a signal during set-up is kept for the first step, which saves and stops
        self._stop = StopRequest().__enter__()
        impl = self.impl
        try:
            self.accelerator = start_accelerator(
                self.run_dir, mixed_precision=impl.mixed_precision, cpu=self._cpu, log_with=impl.log_with
            )
        except BaseException:
            self._stop.__exit__(None, None, None)
            raise
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main = self.accelerator.is_main_process
        self._failures = FailureAgreement(self.rank, self.world)
        try:
            torch.set_num_threads(impl.threads or threads_per_process())
            hold_run_dir(self.run_dir, self.accelerator)
            self._check_push_token()
            self.checkpoint = self._agreed_checkpoint()
            write_recipe(self.recipe, self.run_dir, self.accelerator)
        except BaseException as err:
            self._stop.__exit__(None, None, None)
            self._close(err)
            raise
        return self

    def __exit__(self, kind, error, tb) -> None:
        self._stop.__exit__(kind, error, tb)
        self._close(error)

    def _close(self, error: BaseException | None) -> None:
        """Close the bar, the trackers and the process group. After an error on some rank (not a stop
        every rank agreed on, after its checkpoint) several processes raise one `RunFailed`, the same
        on every rank; one process keeps its error as it was (the CLI knows each kind)."""
        from mlm_pretrain.stop import Preempted

        if self._bar is not None:
            self._bar.close()
        agreed_stop = self._stopping and isinstance(error, KeyboardInterrupt | Preempted)
        if error is not None and not agreed_stop and self.world > 1:
            failed = self._failures.fail(error, self.run_dir)
            self._end_without_collectives()
            raise failed from error
        try:
            if self._log is not None:
                self._log.close()  # the loss curve, then accelerate's trackers and the process group
            else:
                self.accelerator.end_training()
        except Exception as secondary:
            if error is None:
                raise
            log.debug("closing the run after %s: %s", type(error).__name__, secondary)
        self._failures.close()

    def _end_without_collectives(self) -> None:
        """Trackers and the process group closed without a collective, which could wait for a dead
        peer (the failure watchdog ends this process if something here hangs all the same)."""
        for tracker in getattr(self.accelerator, "trackers", []):
            try:
                tracker.finish()
            except Exception as err:  # the run has failed already: that error is the one to report
                log.debug("closing tracker %s after a failure: %s", tracker.name, err)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _check_push_token(self) -> None:
        from huggingface_hub import get_token

        if self.impl.push_to_hub and get_token() is None:  # fail now, not at the first push hours later
            raise InputError(
                f"impl.push_to_hub={self.impl.push_to_hub} needs a Hub token: set HF_TOKEN or run "
                "`hf auth login`"
            )

    def _agreed_checkpoint(self) -> Path | None:
        """The checkpoint to resume from, chosen by the main process (which verifies it) and shared, so
        that no rank can pick another (a file damaged between two ranks' reads); its refusal, raised on
        every rank."""
        from mlm_pretrain.run_dir import checkpoint_to_resume

        decision: list = [None]
        if self.main:
            try:
                decision[0] = ("ok", checkpoint_to_resume(self.recipe, self.run_dir))
            except InputError as err:
                decision[0] = ("refused", str(err))
        if self.world > 1:
            torch.distributed.broadcast_object_list(decision, src=0)
        kind, value = decision[0]
        if kind == "refused":
            raise InputError(value)
        return value

    # -- the loop's calls ------------------------------------------------------------------------

    def begin(self, vocab_size: int, *, total: int | None = None, unit: str = "step") -> None:
        """Open the run log (what came after the resumed checkpoint goes) and the progress bar."""
        from tqdm.auto import tqdm

        from mlm_pretrain.checkpoint import read_trainer_state
        from mlm_pretrain.run_log import RunLog, run_config

        if self.checkpoint is not None:
            state = read_trainer_state(self.checkpoint)
            self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
            self._saved_step = self.step
            log.info("resumed from %s (step %d)", self.checkpoint, self.step)
        self._elapsed_before = self.elapsed
        self._window = time.perf_counter(), self.tokens  # where the speed `log_training` reports starts
        config = run_config(self.recipe.to_dict(), vocab_size)
        self._log = RunLog(self.run_dir, self.accelerator, config, resumed_step=self.step)
        self._bar = tqdm(
            total=total if total is not None else self.recipe.max_steps,
            initial=self.step,
            desc=self.recipe.objective,
            unit=unit,
            unit_scale=unit != "step",
            disable=not (self.impl.progress and self.main),
        )

    def progress(self) -> float:
        """The fraction of the run done, by the stop rule furthest along."""
        r = self.recipe
        return max(
            self.step / r.max_steps if r.max_steps else 0.0,
            self.tokens / r.max_tokens if r.max_tokens else 0.0,
            self.elapsed / (60 * r.max_minutes) if r.max_minutes else 0.0,
        )

    def finished(self) -> bool:
        return self.progress() >= 1.0

    def step_done(self, tokens: int, bar: int = 1) -> None:
        """Count a step of `tokens` tokens (the bar advances by `bar` of its units)."""
        self.step += 1
        self.tokens += tokens
        self.elapsed = self._elapsed_before + time.perf_counter() - self._started
        if self.recipe.max_minutes and self.world > 1:  # every process must stop at the same step
            elapsed = torch.tensor(self.elapsed, device=self.accelerator.device)
            self.elapsed = float(self.accelerator.reduce(elapsed, "max"))
        self._bar.update(bar)

    def due(self, every: int) -> bool:
        return self.step % every == 0

    def log(self, **metrics: float) -> None:
        self._log.log(self.step, **metrics)

    def log_training(self, **metrics: float) -> None:
        """Log `metrics` with the tokens so far and the tokens per second since the last call, and
        show them on the progress bar."""
        now = time.perf_counter()
        speed = (self.tokens - self._window[1]) / max(now - self._window[0], 1e-9)
        self._window = now, self.tokens
        self.log(**metrics, tokens=self.tokens, tokens_per_s=speed)
        self._bar.set_postfix({key: f"{value:.3g}" for key, value in metrics.items()}, tok_s=f"{speed:,.0f}")

    def end_step(self, files: Callable[[], CheckpointFiles]) -> None:
        """Save on the cadence, at the end and when a stop was asked for; push on its cadence; then
        stop if asked. `files` makes the objective's part of the checkpoint."""
        stopping = self._stop.requested(self.accelerator)
        finished = self.finished()
        if self.due(self.impl.save_every) or finished or stopping:
            self.save(files())
        if stopping:
            self._stopping = stopping
            self._bar.close()
            self._stop.stop(stopping, self.step, self.run_dir)

    def save(self, files: CheckpointFiles) -> None:
        """Checkpoint this step (once: a step saved already is not written again)."""
        from mlm_pretrain.checkpoint import write_atomically

        if self._saved_step == self.step:
            return
        counters = {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed}
        write_atomically(self.run_dir, self.step, self.accelerator, files, counters, self.impl.keep_last)
        self._saved_step = self.step

    def push_due(self) -> bool:
        impl = self.impl
        return bool(
            impl.push_to_hub
            and impl.push_every
            and not self.finished()
            and self.due(impl.save_every * impl.push_every)
        )

    def export(self, directory: Path, write_files: Callable[[Path], None], metrics: dict) -> Path:
        """`directory` written whole (atomically) by the main process: the objective's files, the model
        card and the recipe as run (paths made portable). Every process calls this."""
        from mlm_pretrain.card import portable_recipe, run_card
        from mlm_pretrain.checkpoint import atomic_directory

        if self.main:
            recipe = portable_recipe(self.recipe.to_dict(), self.run_dir)
            with atomic_directory(directory, locked=True) as partial:
                write_files(partial)
                (partial / "README.md").write_text(run_card(recipe, metrics, self.step, self.tokens))
                (partial / "recipe.yaml").write_text(_yaml(recipe))
        self.accelerator.wait_for_everyone()
        return directory

    def push(self, directory: Path) -> None:
        from mlm_pretrain.hub import push_checkpoint

        if self.main and self.impl.push_to_hub:
            push_checkpoint(directory, self.impl.push_to_hub, step=self.step, private=self.impl.push_private)

    def finish(self, metrics: dict, write_export: Callable[[Path], None]) -> Path:
        """Log the final metrics, export `final/` and push it; a stop asked for since the last step
        stops before the export (the last checkpoint is saved: `--resume` exports)."""
        self.log(**metrics)
        if stopping := self._stop.requested(self.accelerator):
            self._stopping = stopping
            self._stop.stop(stopping, self.step, self.run_dir)
        final = self.export(self.run_dir / "final", write_export, metrics)
        self.push(final)
        return final


def _yaml(recipe: dict) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False)
