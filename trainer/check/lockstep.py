"""The lockstep run (``trainer compare --steps N``): native and custom copies trained side by side, divergence logged."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.check.diff import diff
from trainer.config import Config
from trainer.loop import Trainer


def lockstep(cfg: Config, steps: int) -> tuple[bool, Path]:
    """Train native and custom copies side by side on the same batches for ``steps`` steps; log their divergence.

    Writes ``<log.dir>/<name>-lockstep/version_<N>/`` with ``lockstep/loss/{native,custom}``
    (overlaid on one chart through a custom-scalars layout), ``lockstep/loss_abs_diff``,
    ``lockstep/param_max_abs_diff``, ``lockstep/param_rel_l2`` and ``lockstep/param_score``
    (max |c - n| / (atol + rtol |n|); above 1 is outside tolerance).

    Returns:
        ``(ok, run_dir)``: ok when every step's parameters stayed within tolerance.
    """
    from torch.utils.tensorboard import SummaryWriter

    custom_map = cfg.layers if any(v == "custom" for v in cfg.layers.values()) else {"default": "custom"}
    plain = dataclasses.replace(cfg, compare=dataclasses.replace(cfg.compare, every=None))  # no shadow mode here
    native = Trainer(dataclasses.replace(plain, layers={"default": "native"}))
    custom = Trainer(dataclasses.replace(plain, layers=custom_map))
    run_dir = checkpoint.create_run_dir(cfg.log.dir, f"{cfg.name}-lockstep")
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    writer = SummaryWriter(str(run_dir))
    writer.add_custom_scalars({"lockstep": {
        "loss": ["Multiline", ["lockstep/loss/native", "lockstep/loss/custom"]],
        "divergence": ["Multiline", ["lockstep/param_max_abs_diff", "lockstep/loss_abs_diff"]]}})
    ok = True
    try:
        for step, group in enumerate(islice(_groups(native), steps), start=1):
            rng = checkpoint.rng_state()  # the CPU's generator and, on a GPU, the device's
            loss_n = native.train_step(group)
            checkpoint.set_rng_state(rng)  # the same dropout masks in both
            loss_c = custom.train_step(group)
            pn = torch.cat([p.detach().flatten() for p in native.model.parameters()])
            pc = torch.cat([p.detach().flatten() for p in custom.model.parameters()])
            d = diff("parameters", "param", pc, pn, cfg.compare.rtol, cfg.compare.atol)
            ok = ok and d.ok
            for tag, value in {"loss/native": float(loss_n), "loss/custom": float(loss_c),
                               "loss_abs_diff": abs(float(loss_n) - float(loss_c)),
                               "param_max_abs_diff": d.max_abs_diff, "param_rel_l2": d.rel_l2,
                               "param_score": d.score}.items():
                writer.add_scalar(f"lockstep/{tag}", value, step)
    finally:
        writer.close()
    return ok, run_dir


def _groups(trainer) -> Iterator[list]:
    """The trainer's batches, grouped by ``train.accumulate``, epoch after epoch."""
    epoch = 0
    while True:
        trainer.sampler.set_epoch(epoch)
        batches = iter(trainer.train_loader)
        while group := list(islice(batches, trainer.cfg.train.accumulate)):
            yield group
        epoch += 1
