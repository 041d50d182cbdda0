"""The Trainer: the parts ``build`` makes from a config, trained by the plain zero_grad / forward / loss / backward / step loop.

Per-step work of one's own attaches through ``trainer.callbacks.Callback``.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint, console, distributed, targets
from trainer.build import build, seed_everything  # noqa: F401  (seed_everything: also the loop's public name)
from trainer.callbacks import Callback, built_in
from trainer.config import Config, load_config
from trainer.errors import ConfigError
from trainer.logs import RunLog, flatten, hparams_first
from trainer.monitor import Monitor
from trainer.stops import Interrupted, InterruptedTwice, Stops  # noqa: F401  (the loop's public names)


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


NULL = contextlib.nullcontext()  # reusable: entering it does nothing


def grad_norm(model: torch.nn.Module) -> float:
    """The 2-norm of all parameter grads together (one sync).

    A norm per tensor, then the norm of those: ``get_total_norm`` spends ~90 us grouping
    tensors by device and dtype first, a fifth of a small model's step at every log.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def first_difference(saved: dict[str, Any], model: dict[str, Any]) -> str | None:
    """The first parameter that a checkpoint's model and this model disagree on, in words."""
    for name, tensor in model.items():
        if name not in saved:
            return f"parameter {name} {list(tensor.shape)} is not in the checkpoint"
        if saved[name].shape != tensor.shape:
            return (f"parameter {name} is {list(saved[name].shape)} in the checkpoint, "
                    f"{list(tensor.shape)} in this model")
    extra = next((name for name in saved if name not in model), None)
    return f"the checkpoint has parameter {extra}, which this model lacks" if extra else None


class Trainer:
    """Trains the model a config describes.

    Everything is built (by ``trainer.build``) and checked in the constructor, so a bad
    config fails before anything is written; ``fit`` creates the run directory and trains.
    The step runs ``net`` (the model, under DDP and ``torch.compile`` when asked) and
    ``loss``; validation runs the plain ``model`` and ``loss_fn``.

    Args:
        cfg: a ``Config`` (from ``load_config``), a mapping or a YAML path.
        resume: a run directory to continue from its newest good checkpoint, in place.
        callbacks: per-step work of your own (``trainer.Callback``), run in order after the
            built-in ones the config asks for (shadow mode, NaN diagnosis).
        report: print the run directory at the start, a progress line every ``log.every`` steps
            when no bar is shown, and a summary at the end (``trainer run`` does; rank 0 only).
        label: shown on those lines, e.g. a sweep's values ``optimizer.lr=0.1``; its keys lead
            the TensorBoard hparams.
    """

    def __init__(self, cfg: Config | dict | str | PathLike, *, resume: str | PathLike | None = None,
                 callbacks: Sequence[Callback] = (), report: bool = False, label: str = ""):
        self.cfg = cfg = cfg if isinstance(cfg, Config) else load_config(cfg)
        t = cfg.train
        parts = build(cfg)  # builds and checks everything the config names; writes nothing
        self.env, self.device = parts.env, parts.device
        self.model, self.loss_fn = parts.model, parts.loss  # as built: validation and checkpoints use these
        self.optimizer, self.scheduler = parts.optimizer, parts.scheduler
        self.autocast, self.scaler = parts.autocast, parts.scaler
        self.train_loader, self.sampler, self.val_loader = parts.train_loader, parts.sampler, parts.val_loader
        self.batches_per_epoch = parts.batches_per_epoch
        self.steps_per_epoch, self.total_steps = parts.steps_per_epoch, parts.total_steps
        self.ddp = distributed.wrap(self.model, self.env)
        self.net = torch.compile(self.ddp) if t.compile else self.ddp  # the model as the step runs it
        # the loss too: a twin loss is a dozen small ops that inductor fuses into a kernel or two
        self._compiled_loss = torch.compile(self.loss_fn) if t.compile else None
        self.monitor = Monitor(t.monitor, t.monitor_mode, t.min_delta, t.patience)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.metrics: dict[str, float] = {}
        self.run_dir: Path | None = None
        self.checkpoints: checkpoint.Checkpoints | None = None
        self.log = RunLog(None, total=None, initial=0, progress=False, enabled=False)  # fit() opens the run's own
        self._rng: dict[str, Any] | None = None
        self.stops = Stops()  # SIGINT, SIGTERM, SIGUSR1
        self._window: list[torch.Tensor] = []
        self._skipped = self._samples = 0
        self._validated_at = self._saved_at = -1
        self.stopped_early = False
        self._clock = time.perf_counter()  # restarted when fit() starts
        self.callbacks: list[Callback] = [*built_in(self), *callbacks]
        self.report, self.label = report and self.env.main, label
        if resume is not None:
            self.run_dir = Path(resume)
            self.checkpoints = checkpoint.Checkpoints(self.run_dir, t.keep_checkpoints, background=t.async_checkpoint,
                                                      lock=self.env.main)
            state, path, problems = self.checkpoints.load()
            for problem in problems:  # a newer checkpoint was damaged: say so, and which one is used
                print(f"warning: {problem}; resuming from {path.relative_to(self.run_dir)} (step {state['step']}), "
                      "the newest good checkpoint", file=sys.stderr)
            self.restore(state)

    @property
    def loss(self):
        """The loss as the training step calls it: ``loss_fn``, compiled under ``train.compile``."""
        return self.loss_fn if self._compiled_loss is None else self._compiled_loss

    # --- the loop -------------------------------------------------------------------------

    def train_step(self, batches: list) -> torch.Tensor:
        """One optimizer step over ``batches`` (K accumulated micro-batches); returns the detached mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        k, losses = len(batches), []
        for i, (x, y) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.no_sync() if i < k - 1 else NULL:  # under DDP, all-reduce on the last micro-batch only
                with self.autocast:
                    loss = self.loss(self.net(x), y)
                # the mean of K equal micro-batch means is the mean of one K-times-larger batch
                self.scaler.scale(loss / k if k > 1 else loss).backward()
            losses.append(loss.detach())
            self._samples += x.shape[0]
        loss = losses[0] if k == 1 else torch.stack(losses).mean()
        if self.cfg.train.skip_nonfinite and not torch.isfinite(loss):  # a device sync, only in this mode
            self._skipped += 1
            return loss
        if self.cfg.train.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None and self.scheduler.interval == "step":
            self.scheduler.step()
        return loss

    def fit(self) -> FitResult:
        """Train until ``train.max_steps``, ``train.max_epochs`` or early stopping; validate, log, checkpoint."""
        cfg, env = self.cfg, self.env
        fresh = self.run_dir is None
        started = time.perf_counter()
        if not fresh and self.finished():  # nothing to train: write nothing, say so
            if self.report:
                t = self.cfg.train
                limit = (f"train.max_steps={2 * self.step}" if t.max_steps and self.step >= t.max_steps
                         else f"train.max_epochs={self.epoch + 10}")
                console.say(f"run {self.run_dir} already finished at step {self.step} ({self.stop_reason()}); "
                            "nothing to do (raise train.max_epochs or train.max_steps to train on, e.g. "
                            f"{console.resume_command(self.run_dir)} {limit})")
            self.checkpoints.close()
            return self.result(started, "already finished")
        if fresh:
            made = str(checkpoint.create_run_dir(cfg.log.dir, cfg.name)) if env.main else None
            self.run_dir = Path(distributed.broadcast(made, env))
            self.checkpoints = checkpoint.Checkpoints(self.run_dir, cfg.train.keep_checkpoints,
                                                      background=cfg.train.async_checkpoint, lock=env.main)
            if env.main:
                (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        elif env.main:
            self.record_resume()
        if self.report:
            console.say(console.start_line(self.run_dir, self.label))
            if not fresh:
                console.say(f"resuming from step {self.step} (epoch {self.epoch})"
                            + console.leftovers_note(self.checkpoints.leftovers))
        self.log = RunLog(self.run_dir, total=self.total_steps, initial=self.step, progress=cfg.log.progress,
                          enabled=env.main)
        if fresh:
            self.log.text("config", "```yaml\n" + cfg.to_yaml() + "```")
        if fresh and cfg.log.graph:
            self.log.graph(self.model, next(iter(self.train_loader))[0].to(self.device))
        if self._rng is not None:
            checkpoint.set_rng_state(self._rng)
        self._clock = time.perf_counter()
        with self.stops.installed():  # the clean-up too: a signal during it must not cut it short
            try:
                while not self.finished():
                    self.train_epoch()
                self.finish()
                self.checkpoints.wait()  # the last checkpoint is on disk before fit returns
            except BaseException as e:
                self.log.close()
                self.checkpoints.close()  # the NaN diagnosis replays the run from its checkpoints
                e.run_dir = self.run_dir  # the CLI's message names it, with the command that resumes it
                for cb in self.callbacks:
                    cb.on_error(self, e)
                raise
            finally:
                self.checkpoints.close()
                self.log.close()
        result = self.result(started, self.stop_reason())
        if self.report:
            console.say(console.summary(result, self.label))
        return result

    def stop_reason(self) -> str:
        t = self.cfg.train
        if self.stopped_early:
            return f"early stopping ({t.monitor} did not improve for {console.plural(t.patience, 'check')})"
        if t.max_steps and self.step >= t.max_steps:
            return f"max_steps={t.max_steps}"
        return f"max_epochs={t.max_epochs}"

    def result(self, started: float, reason: str) -> FitResult:
        best_path = self.run_dir / "checkpoints" / checkpoint.BEST if self.run_dir is not None else None
        return FitResult(self.run_dir, dict(self.metrics), self.step, self.epoch, self.stopped_early, reason,
                         time.perf_counter() - started, self.monitor.metric, self.monitor.best,
                         best_path if best_path is not None and best_path.exists() else None)

    def record_resume(self) -> None:
        """Keys this resume changed go into ``config.yaml``; ``resumes.yaml`` keeps each resume (time, step, keys)."""
        import datetime

        import yaml

        path = self.run_dir / "config.yaml"
        old = flatten(yaml.safe_load(path.read_text())) if path.exists() else {}
        new = flatten(self.cfg.to_dict())
        changed = {k: v for k, v in new.items() if k not in old or old[k] != v}
        history = self.run_dir / "resumes.yaml"
        entries = (yaml.safe_load(history.read_text()) or []) if history.exists() else []
        entries.append({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "step": self.step, "overrides": changed})
        history.write_text(yaml.safe_dump(entries, sort_keys=False))
        path.write_text(self.cfg.to_yaml())

    def train_epoch(self) -> None:
        every = self.cfg.log.every
        epochs = self.cfg.train.max_epochs
        self.log.bar.set_description_str(f"epoch {self.epoch + 1}" + (f"/{epochs}" if epochs else ""), refresh=False)
        for group in self.batch_groups():
            for cb in self.callbacks:
                cb.before_step(self)
            try:
                loss = self.train_step(group)
            except (IndexError, RuntimeError) as e:  # a class index out of range is named, not a traceback
                raise targets.explain(self, group, e) or e
            self._window.append(loss)
            self.batch_in_epoch += len(group)
            self.step += 1
            self.log.bar.update()
            if self.step % every == 0:
                self.log_train()
            for cb in self.callbacks:
                cb.after_step(self, loss)
            self.on_step()
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            if self.scheduler is not None and self.scheduler.interval == "epoch":
                self.scheduler.step()
            if self.cfg.train.val_every is None:
                self.validate()
            if not self.finished():
                self.save()

    def batch_groups(self) -> Iterator[list]:
        """This epoch's groups of ``train.accumulate`` micro-batches, from ``batch_in_epoch`` on, until the run is done.

        The order depends only on (seed, epoch), so a resumed run sees the same groups. The
        caller advances ``batch_in_epoch`` and ``step`` after each group (checkpoints record them).
        """
        self.sampler.set_epoch(self.epoch)
        self.sampler.skip = self.batch_in_epoch * self.cfg.data.batch_size
        batches = self.stops.received(self.train_loader)  # with workers: a second signal waits for the batch
        if self.device.type == "cuda":  # a bad class index would be a device-side assert: checked on the host
            batches = targets.on_host(self, batches)
        while self.batch_in_epoch < self.batches_per_epoch and not self.finished():
            yield list(islice(batches, min(self.cfg.train.accumulate, self.batches_per_epoch - self.batch_in_epoch)))

    def on_step(self) -> None:
        """Cadenced work after each step: validation, checkpoints, histograms, interrupts."""
        t, log, step = self.cfg.train, self.cfg.log, self.step
        self.checkpoints.check()  # a background write that failed stops the run here
        if t.val_every and step % t.val_every == 0:
            self.validate()
        if t.checkpoint_every and step % t.checkpoint_every == 0:
            self.save()
        if log.histograms_every and step % log.histograms_every == 0:
            self.log.histograms(step, self.model)
        # a stop signal: one process stops after this step; under DDP every rank must stop at the same
        # step, so they vote at the log cadence
        if self.env.distributed:
            stop = step % log.every == 0 and distributed.any_rank(self.stops.first is not None, self.env)
        else:
            stop = self.stops.first is not None
        if stop:
            self.save()
            self.checkpoints.wait()
            raise self.stops.interrupted()

    def finished(self) -> bool:
        t = self.cfg.train
        return bool(self.stopped_early or t.max_steps and self.step >= t.max_steps
                    or t.max_epochs and self.epoch >= t.max_epochs)

    def finish(self) -> None:
        self.log_train()  # the last steps, even off the cadence
        if self.val_loader is not None and self._validated_at != self.step:
            self.validate()
        self.save()
        swept = [item.partition("=")[0] for item in self.label.split()]
        self.log.hparams(hparams_first(flatten(self.cfg.to_dict()), swept), self.metrics)
        for cb in self.callbacks:
            cb.on_end(self)

    # --- measuring ------------------------------------------------------------------------

    def check_finite(self, weights: bool = False) -> tuple[float, int]:
        """The sum and count of the finite losses since the last log, after one sync.

        Unless ``train.skip_nonfinite``, a non-finite loss raises NonFiniteLoss naming its step.
        With ``weights``, before a checkpoint, the weights are checked too: a non-finite
        gradient leaves its own step's loss finite but poisons the weights.
        """
        losses = torch.stack(self._window) if self._window else torch.zeros(0)
        total, count = float(losses.sum(dtype=torch.float64)), len(losses)  # finite sum: all finite
        if not math.isfinite(total):
            finite = torch.isfinite(losses)
            if not self.cfg.train.skip_nonfinite:
                bad = int((~finite).nonzero()[0])
                raise NonFiniteLoss(self.step - len(losses) + 1 + bad, float(losses[bad]), kept=self._saved_at >= 0)
            total, count = float(losses[finite].sum(dtype=torch.float64)), int(finite.sum())
        # a finite sum has no inf or NaN in it: one pass and one sync; only a sum that overflowed needs a closer look
        params = [p.detach() for p in self.model.parameters()] if weights else []
        if params and not (math.isfinite(torch.stack([p.float().sum() for p in params]).sum())
                           or all(bool(torch.isfinite(p).all()) for p in params)):
            raise NonFiniteLoss(self.step, float("nan"), what="the weights are", kept=self._saved_at >= 0,
                                skipping=self.cfg.train.skip_nonfinite)
        return total, count

    def log_train(self) -> None:
        """Log the mean loss of the steps since the last call (and lr, grad norm, speed): one sync."""
        if not self._window:
            return
        total, count = self.check_finite()
        if count == 0:  # train.skip_nonfinite skipped every step of this log window
            raise NonFiniteLoss(self.step, float("nan"), kept=self._saved_at >= 0, skipping=True,
                                skipped=len(self._window))
        self._window = []
        if self.env.distributed:
            total, count = distributed.all_sum(torch.tensor([total, count], dtype=torch.float64, device=self.device),
                                               self.env).tolist()
        mean = total / count if count > 0 else float("nan")
        now = time.perf_counter()
        speed = self._samples * self.env.world_size / max(now - self._clock, 1e-9)
        self._samples, self._clock = 0, now
        lr = self.optimizer.param_groups[0]["lr"]
        values = {"train/loss": mean, "train/lr": lr, "train/grad_norm": grad_norm(self.model),
                  "train/samples_per_sec": speed}
        if self.cfg.train.skip_nonfinite:
            values["train/skipped_steps"] = self._skipped
        self.log.scalars(self.step, values)
        self.log.progress(f"loss={mean:.4g}, lr={lr:.3g}, samples_per_s={speed:.0f}")
        if self.report and self.log.bar.disable:  # off a terminal: a plain line instead of the bar
            epoch = self.epoch if self.batch_in_epoch else self.epoch - 1  # at an epoch's end: that epoch
            console.say(console.progress_line(self.step, self.total_steps, epoch, self.cfg.train.max_epochs,
                                              mean, lr, speed))
        self.metrics["train/loss"] = mean
        self.watch({"train/loss": mean})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """``val/loss`` (mean over samples) and, for class-index targets, ``val/accuracy``."""
        self.model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
        classes = False
        for x, y in self.stops.received(self.val_loader):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast:
                out = self.model(x)
                loss = self.loss_fn(out, y)
            totals[0] += loss.double() * len(x)
            totals[2] += len(x)
            if out.dim() >= 2 and out.shape[1] > 1 and not y.is_floating_point():
                classes = True
                totals[1] += (out.argmax(1) == y).sum()
        self.model.train()
        totals = distributed.all_sum(totals, self.env)
        out = {"val/loss": float(totals[0] / totals[2])}
        if classes:
            out["val/accuracy"] = float(totals[1] / totals[2])
        return out

    def validate(self) -> None:
        if self.val_loader is None:
            return
        values = self.evaluate()
        self.log.scalars(self.step, values)
        self.metrics.update(values)
        self._validated_at = self.step
        if self.scheduler is not None and self.scheduler.interval == "metric":
            self.scheduler.step(values["val/loss"])
        self.watch(values)

    def watch(self, values: dict[str, float]) -> None:
        """Feed the monitored metric: save ``best.pt`` when it improves, stop early when patience runs out."""
        if self.monitor.update(values):
            self.save(best=True)
        elif self.monitor.exhausted:
            self.stopped_early = True

    # --- state ----------------------------------------------------------------------------

    def save(self, best: bool = False) -> None:
        """Checkpoint (rank 0), after checking that the losses since the last log and the weights are finite."""
        self.check_finite(weights=True)
        if self._saved_at == self.step and not best:
            return
        self._saved_at = self.step
        if self.env.main:
            self.checkpoints.save(self.state_dict(), self.step, best=best)

    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs, as tensors and plain values (``torch.load(weights_only=True)``)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "rng": checkpoint.rng_state(),
            "monitor": self.monitor.state_dict(),
            "metrics": dict(self.metrics),
            "config": self.cfg.to_dict(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            why = first_difference(state.get("model", {}), self.model.state_dict()) or str(e).strip().splitlines()[0]
            raise ConfigError("--resume", f"the checkpoint does not fit this config: {why}",
                              suggestion="resume with the config the run was started with (its config.yaml)") from None
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.apply_optimizer_changes(state.get("config", {}).get("optimizer"))
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.monitor.load_state_dict(state.get("monitor", {"best": None, "bad_checks": 0}))
        self.metrics = dict(state.get("metrics", {}))
        self._rng = state["rng"]
        self._saved_at = self.step
        self.stopped_early = self.monitor.exhausted  # an early-stopped run stays finished

    def apply_optimizer_changes(self, saved: dict[str, Any] | None) -> None:
        """Hyperparameters changed on resume (``optimizer.lr=0.5 --resume RUN``) go into the restored optimizer,
        so what runs is what the run's config records; what cannot be carried over is refused.

        ``load_state_dict`` brings back the checkpoint's param groups, old values included, so without
        this an override would be recorded but not run.
        """
        if saved is None:  # a checkpoint without its config: nothing to tell apart
            return
        now = self.cfg.optimizer
        if saved.get("name") != now.name:
            raise ConfigError("optimizer.name", f"the run was trained with {saved.get('name')}, its state cannot "
                              f"become {now.name}'s", suggestion="resume with the run's optimizer, or start a new run")
        changed = {k: v for k, v in now.kwargs.items() if saved.get(k, v) != v}
        if "lr" in changed and self.scheduler is not None:
            raise ConfigError("optimizer.lr", "the run's scheduler sets the learning rate from its own state",
                              suggestion="resume without changing optimizer.lr, or start a new run")
        for key, value in changed.items():
            for group in self.optimizer.param_groups:
                if key not in group:
                    raise ConfigError(f"optimizer.{key}", "cannot be changed on resume",
                                      suggestion=f"resume without optimizer.{key}, or start a new run")
                group[key] = tuple(value) if isinstance(group[key], tuple) else value

    # --- helpers --------------------------------------------------------------------------

    def no_sync(self):
        """DDP's no_sync (gradients stay local until the last micro-batch); nothing on one process."""
        return self.ddp.no_sync() if self.env.distributed else NULL
