"""The Trainer: the parts ``build`` makes from a config, trained by the plain zero_grad / forward / loss / backward / step loop.

Per-step work of one's own attaches through ``trainer.callbacks.Callback``.
"""
from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from itertools import islice
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint, console, distributed, measure, resume as resuming, stops, targets
from trainer.build import build, seed_everything  # noqa: F401  (seed_everything: also the loop's public name)
from trainer.callbacks import Callback, built_in
from trainer.config import Config, load_config
from trainer.logs import RunLog, flatten, hparams_first
from trainer.monitor import Monitor
# the run's result and its stops, importable from here as they always were
from trainer.signals import Interrupted, InterruptedTwice, Stops  # noqa: F401
from trainer.stops import FitResult, NonFiniteLoss  # noqa: F401

NULL = contextlib.nullcontext()  # reusable: entering it does nothing


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
        self._graph: torch.Tensor | None = None  # the last step's loss, graph attached
        self._skipped = self._samples = 0
        self._validated_at = self._saved_at = -1
        self.stopped_early = False
        self._clock = time.perf_counter()  # restarted when fit() starts
        self.callbacks: list[Callback] = [*built_in(self), *callbacks]
        self.report, self.label = report and self.env.main, label
        if resume is not None:
            self.run_dir = Path(resume)
            self.checkpoints, state = resuming.open_run(self.run_dir, t.keep_checkpoints,
                                                        background=t.async_checkpoint, lock=self.env.main)
            self.restore(state)

    @functools.cached_property
    def config_yaml(self) -> str:
        """The resolved config as YAML, the text of the run's ``config.yaml``; made once, as every checkpoint
        holds it: one string pickles in one go, a dict's ~130 keys and values would take a third of a small
        checkpoint's serialization."""
        return self.cfg.to_yaml()

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
        # the last graph (its saved tensors already freed by backward) lives until the next step, as a
        # hand-written loop's `loss` does: the parameters' gradient accumulators then live on, not rebuilt per step
        self._graph = loss
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
                console.say(stops.already_finished(self.run_dir, cfg.train, self.step, self.epoch, self.stop_reason()))
            self.checkpoints.close()
            return self.result(started, "already finished")
        if fresh:
            made = str(checkpoint.create_run_dir(cfg.log.dir, cfg.name)) if env.main else None
            self.run_dir = Path(distributed.broadcast(made, env))
            self.checkpoints = checkpoint.Checkpoints(self.run_dir, cfg.train.keep_checkpoints,
                                                      background=cfg.train.async_checkpoint, lock=env.main)
            if env.main:
                (self.run_dir / "config.yaml").write_text(self.config_yaml)
        elif env.main:
            resuming.record_resume(self.run_dir, cfg, self.step)
        if self.report:
            console.say(console.start_line(self.run_dir, self.label))
            if not fresh:
                console.say(f"resuming from step {self.step} (epoch {self.epoch})"
                            + console.leftovers_note(self.checkpoints.leftovers))
        self.log = RunLog(self.run_dir, total=self.total_steps, initial=self.step, progress=cfg.log.progress,
                          enabled=env.main)
        if fresh:
            self.log.text("config", "```yaml\n" + self.config_yaml + "```")
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
        return stops.stop_reason(self.cfg.train, self.step, self.stopped_early)

    def result(self, started: float, reason: str) -> FitResult:
        best_path = self.run_dir / "checkpoints" / checkpoint.BEST if self.run_dir is not None else None
        return FitResult(self.run_dir, dict(self.metrics), self.step, self.epoch, self.stopped_early, reason,
                         time.perf_counter() - started, self.monitor.metric, self.monitor.best,
                         best_path if best_path is not None and best_path.exists() else None)

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
        return stops.finished(self.cfg.train, self.step, self.epoch, self.stopped_early)

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
        skip, kept = self.cfg.train.skip_nonfinite, self._saved_at >= 0
        total, count = measure.window_sum(self._window, self.step, skip_nonfinite=skip, kept=kept)
        if weights:
            measure.check_weights(self.model, self.step, skip_nonfinite=skip, kept=kept)
        return total, count

    def log_train(self) -> None:
        """Log the mean loss of the steps since the last call (and lr, grad norm, speed): one sync."""
        measure.log_train(self)

    def evaluate(self) -> dict[str, float]:
        """``val/loss`` (mean over samples) and, for class-index targets, ``val/accuracy``."""
        return measure.evaluate(self.model, self.loss_fn, self.stops.received(self.val_loader), self.autocast,
                                self.device, self.env)

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
        return resuming.state_dict(self)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a ``state_dict``): the parts, the position, the monitor, the RNG (at ``fit``)."""
        resuming.restore(self, state)

    # --- helpers --------------------------------------------------------------------------

    def no_sync(self):
        """DDP's no_sync (gradients stay local until the last micro-batch); nothing on one process."""
        return self.ddp.no_sync() if self.env.distributed else NULL
