"""How a run ends: its result, the errors that stop it, and what it says then (the signals are in ``signals``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainer import console
from trainer.config import TrainConfig


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    stopped_early: bool = False
    reason: str = ""                # why it stopped: max_steps, max_epochs, early stopping, already finished
    seconds: float = 0.0            # wall time of this fit() call
    monitor: str | None = None      # train.monitor, and its best value and checkpoint
    best: float | None = None
    best_path: Path | None = None


class NonFiniteLoss(RuntimeError):
    """The loss (or, after a non-finite gradient, the weights) went NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, step: int, value: float, what: str = "the loss is", *, kept: bool = True,
                 skipping: bool = False, skipped: int = 0):
        self.step, self.value, self.diagnosis, self.kept = step, value, None, kept
        where = "at" if what == "the loss is" else "by"
        head = (f"every one of the {skipped} steps up to step {step} had a non-finite loss and was skipped, so "
                "nothing trains" if skipped else f"{what} {value} {where} step {step}")
        tail = "the last good checkpoint is kept" if kept else "no checkpoint had been saved yet"
        hint = "" if skipping else " (set train.skip_nonfinite: true to skip such steps instead)"
        super().__init__(f"{head}; stopped, {tail}{hint}")

    def __str__(self) -> str:
        return super().__str__() + (f"; {self.diagnosis}" if self.diagnosis else "")


def finished(t: TrainConfig, step: int, epoch: int, stopped_early: bool) -> bool:
    """Whether a run at ``step``/``epoch`` has nothing left to train."""
    return bool(stopped_early or t.max_steps and step >= t.max_steps or t.max_epochs and epoch >= t.max_epochs)


def stop_reason(t: TrainConfig, step: int, stopped_early: bool) -> str:
    """Why a finished run stopped, in words: early stopping, max_steps or max_epochs."""
    if stopped_early:
        return f"early stopping ({t.monitor} did not improve for {console.plural(t.patience, 'check')})"
    if t.max_steps and step >= t.max_steps:
        return f"max_steps={t.max_steps}"
    return f"max_epochs={t.max_epochs}"


def already_finished(run_dir: Path, t: TrainConfig, step: int, epoch: int, reason: str) -> str:
    """The line a resume of a finished run prints, with a command that trains on."""
    limit = f"train.max_steps={2 * step}" if t.max_steps and step >= t.max_steps else f"train.max_epochs={epoch + 10}"
    return (f"run {run_dir} already finished at step {step} ({reason}); nothing to do (raise train.max_epochs or "
            f"train.max_steps to train on, e.g. {console.resume_command(run_dir)} {limit})")
