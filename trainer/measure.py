"""What the loop measures: the mean loss of each log window (checked finite, logged with lr, grad norm and
speed), the weights' finiteness before a checkpoint, and validation loss and accuracy.
"""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from trainer import console, distributed
from trainer.distributed import Env
from trainer.stops import NonFiniteLoss

# Annotations name the Trainer as a string: this module is below the loop and never imports it.


def window_sum(window: list[torch.Tensor], last_step: int, *, skip_nonfinite: bool, kept: bool) -> tuple[float, int]:
    """The sum and count of the finite losses of steps ``last_step - len(window) + 1 .. last_step``, after one sync.

    Unless ``skip_nonfinite``, a non-finite loss raises NonFiniteLoss naming its step.
    """
    losses = torch.stack(window) if window else torch.zeros(0)
    total, count = float(losses.sum(dtype=torch.float64)), len(losses)
    # a finite sum has no inf or NaN in it: one pass and one sync; only a sum that overflowed needs a closer look
    if not math.isfinite(total):
        finite = torch.isfinite(losses)
        if not skip_nonfinite:
            bad = int((~finite).nonzero()[0])
            raise NonFiniteLoss(last_step - len(losses) + 1 + bad, float(losses[bad]), kept=kept)
        total, count = float(losses[finite].sum(dtype=torch.float64)), int(finite.sum())
    return total, count


def mean_over_ranks(total: float, count: int, env: Env, device: torch.device) -> float:
    """``total / count`` with both summed over every rank first (one all-reduce under DDP)."""
    if env.distributed:
        total, count = distributed.all_sum(torch.tensor([total, count], dtype=torch.float64, device=device),
                                           env).tolist()
    return total / count if count > 0 else float("nan")


def check_weights(model: torch.nn.Module, step: int, *, skip_nonfinite: bool, kept: bool) -> None:
    """Raise NonFiniteLoss if a weight is NaN or infinite: a non-finite gradient leaves its own step's loss
    finite but poisons the weights. One sum per tensor and one sync; element by element only if that overflowed."""
    params = [p.detach() for p in model.parameters()]
    if params and not (math.isfinite(torch.stack([p.float().sum() for p in params]).sum())
                       or all(bool(torch.isfinite(p).all()) for p in params)):
        raise NonFiniteLoss(step, float("nan"), what="the weights are", kept=kept, skipping=skip_nonfinite)


def grad_norm(model: torch.nn.Module) -> float:
    """The 2-norm of all parameter grads together (one sync).

    A norm per tensor, then the norm of those: ``get_total_norm`` spends ~90 us grouping
    tensors by device and dtype first, a fifth of a small model's step at every log.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def log_train(trainer: "Trainer") -> None:
    """Log the mean loss of ``trainer``'s steps since the last call (and lr, grad norm, speed): one sync.

    The mean also feeds the monitor (``trainer.watch``), and off a terminal a ``report`` prints a plain line.
    """
    if not trainer._window:
        return
    total, count = trainer.check_finite()
    if count == 0:  # train.skip_nonfinite skipped every step of this log window
        raise NonFiniteLoss(trainer.step, float("nan"), kept=trainer._saved_at >= 0, skipping=True,
                            skipped=len(trainer._window))
    trainer._window = []
    mean = mean_over_ranks(total, count, trainer.env, trainer.device)
    now = time.perf_counter()
    speed = trainer._samples * trainer.env.world_size / max(now - trainer._clock, 1e-9)
    trainer._samples, trainer._clock = 0, now
    lr = trainer.optimizer.param_groups[0]["lr"]
    values = {"train/loss": mean, "train/lr": lr, "train/grad_norm": grad_norm(trainer.model),
              "train/samples_per_sec": speed}
    if trainer.cfg.train.skip_nonfinite:
        values["train/skipped_steps"] = trainer._skipped
    trainer.log.scalars(trainer.step, values)
    trainer.log.progress(f"loss={mean:.4g}, lr={lr:.3g}, samples_per_s={speed:.0f}")
    if trainer.report and trainer.log.bar.disable:  # off a terminal: a plain line instead of the bar
        epoch = trainer.epoch if trainer.batch_in_epoch else trainer.epoch - 1  # at an epoch's end: that epoch
        console.say(console.progress_line(trainer.step, trainer.total_steps, epoch, trainer.cfg.train.max_epochs,
                                          mean, lr, speed))
    trainer.metrics["train/loss"] = mean
    trainer.watch({"train/loss": mean})


@torch.no_grad()
def evaluate(model: torch.nn.Module, loss_fn: Any, loader: Any, autocast: Any, device: torch.device,
             env: Env) -> dict[str, float]:
    """``val/loss`` (mean over samples, over every rank) and, for class-index targets, ``val/accuracy``."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    classes = False
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            out = model(x)
            loss = loss_fn(out, y)
        totals[0] += loss.double() * len(x)
        totals[2] += len(x)
        if out.dim() >= 2 and out.shape[1] > 1 and not y.is_floating_point():
            classes = True
            totals[1] += (out.argmax(1) == y).sum()
    model.train()
    totals = distributed.all_sum(totals, env)
    out = {"val/loss": float(totals[0] / totals[2])}
    if classes:
        out["val/accuracy"] = float(totals[1] / totals[2])
    return out
