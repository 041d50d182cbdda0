"""The lockstep run (``trainer compare --steps N``): native and custom trained side by side, each step's custom gradients judged against native's.

Judging the parameters after N steps judges the optimizer too: where a parameter's true
gradient is 0 (a Linear bias before a batch norm), both sides compute rounding noise, and
Adam's first step turns any noise into an update of size lr. So the verdict is per step,
on the same weights: before each step a native *probe* takes the custom model's weights
and buffers, runs the same batch (the same dropout masks), and its gradients and updated
buffers are compared with the custom model's, with the tolerance of one-shot ``trainer
compare`` (``|c - n| <= atol + rtol |n|`` per element; noise below atol passes). A tensor
outside it still passes when a float64 native run of the step shows the custom value about
as accurate as native's (float32 rounding through many layers, not a wrong twin). The
custom run then steps on its own gradients, so the comparison follows its trajectory.

Free-running native and custom runs are logged too (their losses, how far their
parameters drifted apart): a picture, not the verdict.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.check.compare import Comparison, Culprit, owners
from trainer.check.diff import TensorDiff, diff, diffs, size
from trainer.config import Config
from trainer.loop import Trainer


@dataclass
class Lockstep:
    """What the lockstep run found: ok, and otherwise the first step that diverged, what and where."""

    ok: bool
    run_dir: Path
    steps: int
    failed_steps: list[int] = field(default_factory=list)
    first: list[TensorDiff] = field(default_factory=list)    # what differed at the first failing step
    culprits: list[Culprit] = field(default_factory=list)    # bisected on that step's weights and batch
    drift: float = 0.0                                        # relative L2 of the free runs' parameters at the end

    def lines(self) -> list[str]:
        """The printed verdict: one line, then one per differing tensor and per culprit."""
        if self.ok:
            return [f"{self.run_dir}  ok: custom gradients and buffers within tolerance of native's on the same "
                    f"weights at each of {self.steps} steps (free runs' parameters drifted by relative L2 "
                    f"{self.drift:.3g})"]
        out = [f"{self.run_dir}  MISMATCH: first at step {self.failed_steps[0]}; {len(self.failed_steps)} of "
               f"{self.steps} steps outside tolerance"]
        for d in self.first:
            kind = {"param_grad": "param grad", "buffer": "buffer", "loss": "loss"}[d.kind]
            owner = f" of layer {d.name.rpartition('.')[0]} ({d.layer})" if d.kind != "loss" else ""
            out.append(f"step {self.failed_steps[0]}: {kind} {d.name}{owner}: {size(d)}")
        out += [f"culprit: {c}" for c in self.culprits]
        return out


def _probe_grads(probe, loss_fn, group: list, device, autocast, clip: float | None) -> torch.Tensor:
    """The native probe's gradients on ``group`` as the trainer's step computes them (mean over micro-batches,
    clipped like the trainer clips); returns the mean loss."""
    probe.zero_grad(set_to_none=True)
    k, losses = len(group), []
    for x, y in group:
        x, y = x.to(device), y.to(device)
        with autocast:
            loss = loss_fn(probe(x), y)
        (loss / k if k > 1 else loss).backward()
        losses.append(loss.detach())
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(probe.parameters(), clip)
    return torch.stack(losses).mean()


def run_lockstep(cfg: Config, steps: int) -> Lockstep:
    """Train native and custom copies side by side for ``steps`` steps, judging each step's custom gradients.

    Writes ``<log.dir>/<name>-lockstep/version_<N>/``: ``native/`` and ``custom/`` hold the
    same tags (``lockstep/loss``), so TensorBoard draws the two runs in two colours on one
    chart; the run folder itself holds the divergence: ``lockstep/grad_score`` and
    ``lockstep/buffer_score`` (the verdict's figures: the worst element's
    ``|c - n| / (atol + rtol |n|)``, above 1 fails), ``lockstep/grad_rel_l2``, and the free runs'
    ``lockstep/param_rel_l2`` and ``lockstep/loss_abs_diff``.
    """
    from torch.utils.tensorboard import SummaryWriter

    custom_map = cfg.layers if any(v == "custom" for v in cfg.layers.values()) else {"default": "custom"}
    plain = dataclasses.replace(cfg, compare=dataclasses.replace(cfg.compare, every=None))  # no shadow mode here
    native = Trainer(dataclasses.replace(plain, layers={"default": "native"}))  # both built by trainer.build
    custom = Trainer(dataclasses.replace(plain, layers=custom_map))
    probe = copy.deepcopy(native.model)  # native classes; takes the custom model's state each step
    # native in float64: the judge of a difference beyond tolerance (under autocast there is no such judge)
    reference = (copy.deepcopy(native.model).double(), copy.deepcopy(native.loss_fn).double(), custom.device,
                 cfg.train.clip_grad_norm) if cfg.train.precision == "32" else None
    names = owners(custom.model)
    rtol, atol = cfg.compare.rtol, cfg.compare.atol
    run_dir = checkpoint.create_run_dir(cfg.log.dir, f"{cfg.name}-lockstep")
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    writers = {side: SummaryWriter(str(run_dir / side)) for side in ("native", "custom")}
    writer = SummaryWriter(str(run_dir))
    writer.add_custom_scalars({"lockstep": {
        "loss (native and custom runs)": ["Multiline", ["lockstep/loss$"]],
        "verdict: worst element / tolerance (above 1 fails)": ["Multiline", ["lockstep/grad_score",
                                                                            "lockstep/buffer_score"]],
        "drift of the free runs": ["Multiline", ["lockstep/param_rel_l2", "lockstep/loss_abs_diff"]]}})
    result = Lockstep(True, run_dir, steps)
    try:
        for step, group in enumerate(islice(_groups(native), steps), start=1):
            pre = copy.deepcopy(custom.model.state_dict())
            probe.load_state_dict(pre)
            rng = checkpoint.rng_state()  # the CPU's generator and, on a GPU, the device's
            loss_n = native.train_step(group)
            checkpoint.set_rng_state(rng)  # the same dropout masks in all three
            loss_c = custom.train_step(group)
            after = checkpoint.rng_state()
            checkpoint.set_rng_state(rng)
            loss_p = _probe_grads(probe, native.loss_fn, group, custom.device, custom.autocast,
                                  cfg.train.clip_grad_norm)
            checkpoint.set_rng_state(after)
            judged = _judge(custom.model, probe, names, rtol, atol, [(loss_c, loss_p)])
            bad = [d for d in judged if not d.ok]
            rescued = _rescue(bad, custom.model, probe, reference, pre, group, rng, after) if bad and reference else 0
            bad = [d for d in bad if not d.ok]
            if bad:
                if not result.failed_steps:
                    result.first = bad
                    result.culprits = _bisect(cfg, native, custom_map, pre, group)
                result.failed_steps.append(step)
            pn = torch.cat([p.detach().flatten() for p in native.model.parameters()])
            pc = torch.cat([p.detach().flatten() for p in custom.model.parameters()])
            drift = diff("parameters", "param", pc, pn, rtol, atol)
            result.drift = drift.rel_l2
            grads = [d for d in judged if d.kind == "param_grad"]
            buffers = [d for d in judged if d.kind == "buffer"]
            for side, loss in (("native", loss_n), ("custom", loss_c)):
                writers[side].add_scalar("lockstep/loss", float(loss), step)
            for tag, value in {"grad_score": max((_verdict(d) for d in grads), default=0.0),
                               "buffer_score": max((_verdict(d) for d in buffers), default=0.0),
                               "rescued": rescued,
                               "grad_rel_l2": max((d.rel_l2 for d in grads), default=0.0),
                               "param_rel_l2": drift.rel_l2,
                               "loss_abs_diff": abs(float(loss_n) - float(loss_c))}.items():
                writer.add_scalar(f"lockstep/{tag}", value, step)
    finally:
        for w in (writer, *writers.values()):
            w.close()
    result.ok = not result.failed_steps
    return result


RESCUE_FACTOR = 10      # custom may be this many times further from float64 than native is ...
RESCUE_FLOOR = 1e-6     # ... or this close (relative L2), and still pass


def _verdict(d: TensorDiff) -> float:
    """The figure that decided a tensor: its score, capped at 1 when float64 showed it as accurate as native."""
    return min(d.score, 1.0) if d.ok else d.score


def _rescue(bad: list[TensorDiff], model, probe, reference, pre: dict, group: list, rng, after) -> int:
    """Pass the tensors outside elementwise tolerance whose custom value is about as close to a float64 native
    run as the float32 native one is (rounding through many layers, not a wrong twin); returns how many."""
    ref, loss_fn, device, clip = reference
    ref.load_state_dict(pre)  # cast to float64 on copy
    checkpoint.set_rng_state(rng)
    wide = [(x.double() if x.is_floating_point() else x, y.double() if y.is_floating_point() else y)
            for x, y in group]
    _probe_grads(ref, loss_fn, wide, device, contextlib.nullcontext(), clip)
    checkpoint.set_rng_state(after)
    tensors = {}
    for m, key in ((model, "custom"), (probe, "native"), (ref, "float64")):
        for name, p in m.named_parameters():
            tensors[("param_grad", name, key)] = p.grad
        for name, b in m.named_buffers():
            tensors[("buffer", name, key)] = b
    count = 0
    for d in bad:
        c, n, r = (tensors.get((d.kind, d.name, k)) for k in ("custom", "native", "float64"))
        if c is None or n is None or r is None or c.shape != r.shape:
            continue
        r_norm = float(r.norm())
        err_c, err_n = float((c.double() - r).norm()), float((n.double() - r).norm())
        if err_c <= max(RESCUE_FACTOR * err_n, RESCUE_FLOOR * r_norm):
            d.ok = True
            count += 1
    return count


def _judge(model, probe, names: dict[str, str], rtol, atol, losses=()) -> list[TensorDiff]:
    """The loss, each parameter's grad and each floating buffer of the custom model against the native probe's."""
    pairs = [("loss", "loss", c.reshape(1).float(), n.reshape(1).float()) for c, n in losses]
    for (name, p), (_, q) in zip(model.named_parameters(), probe.named_parameters()):
        if p.grad is not None or q.grad is not None:
            pairs.append((name, "param_grad", p.grad if p.grad is not None else torch.full_like(p, float("nan")),
                          q.grad if q.grad is not None else torch.full_like(q, float("nan"))))
    for (name, b), (_, c) in zip(model.named_buffers(), probe.named_buffers()):
        if b.is_floating_point():  # num_batches_tracked counts calls, which the probe repeats
            pairs.append((name, "buffer", b, c))
    out = diffs(pairs, rtol, atol)
    for d in out:
        d.layer = names.get(d.name, "")
    return sorted(out, key=lambda d: -d.score)


def _bisect(cfg, native_trainer, mapping, state: dict, group: list) -> list[Culprit]:
    """One-shot compare on the failing step's weights and batch, to name the culprit layers."""
    model = copy.deepcopy(native_trainer.model)
    model.load_state_dict(state)
    device = native_trainer.device
    batches = [(x.to(device), y.to(device)) for x, y in group]
    comparison = Comparison(model, native_trainer.loss_fn, batches, mapping, rtol=cfg.compare.rtol,
                            atol=cfg.compare.atol, seed=cfg.seed, autocast=native_trainer.autocast)
    report = comparison.report()
    if report.ok:  # the one-shot comparison sees no difference (the step's order of ops, its clipping)
        return []
    return report.culprits


def _groups(trainer) -> Iterator[list]:
    """The trainer's batches, grouped by ``train.accumulate``, epoch after epoch."""
    epoch = 0
    while True:
        trainer.sampler.set_epoch(epoch)
        batches = iter(trainer.train_loader)
        while group := list(islice(batches, trainer.cfg.train.accumulate)):
            yield group
        epoch += 1
