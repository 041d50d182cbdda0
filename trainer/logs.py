"""What a run reports: TensorBoard event files and a tqdm progress bar, both only on rank 0."""
from __future__ import annotations

import sys
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm


MAX_HPARAM_TEXT = 256  # characters of one HParams value; the whole config is in the "config" text entry


def shorten(text: str, limit: int = MAX_HPARAM_TEXT) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class RunLog:
    """TensorBoard scalars, text, histograms, graph and hparams, plus the progress bar.

    Everything is a no-op when ``enabled`` is False (ranks other than 0), so the loop
    calls it unconditionally. Callers pass plain floats: syncing the device is their
    choice, made at the logging cadence only.
    """

    def __init__(self, run_dir: Path | None, *, total: int | None, initial: int, progress: bool | None,
                 enabled: bool = True):
        self.writer = None
        if enabled and run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when a run logs
            # purge_step drops events a crashed run wrote after its last checkpoint, so a resume has no doubles
            self.writer = SummaryWriter(str(run_dir), purge_step=initial or None, flush_secs=30)
        show = sys.stdout.isatty() if progress is None else progress
        self.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stdout, dynamic_ncols=True,
                        mininterval=0.5, disable=not (enabled and show))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """All of ``values`` as one event (one ``add_scalar`` each costs ~150 us: shadow mode logs ~100)."""
        if self.writer is not None and values:
            from tensorboard.compat.proto.summary_pb2 import Summary
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values.items()])
            self.writer._get_file_writer().add_summary(summary, step)

    def progress(self, postfix: str) -> None:
        """The bar's text after the counts (``loss=0.12, lr=0.01``), shown at its next refresh."""
        self.bar.set_postfix_str(postfix, refresh=False)

    def text(self, tag: str, body: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, body, 0)

    def histograms(self, step: int, model: nn.Module) -> None:
        if self.writer is None:
            return
        for name, p in model.named_parameters():
            self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
            if p.grad is not None:
                self.writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), step)

    def graph(self, model: nn.Module, example: torch.Tensor) -> None:
        if self.writer is not None:
            self.writer.add_graph(model, example)

    def hparams(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """The HParams tab's entry for this run, written into this run's own event file."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams
        plain = {k: v if isinstance(v, (bool, int, float)) else shorten(str(v)) for k, v in params.items()}
        # metrics name scalar tags this run already logs; the HParams tab shows their last values
        for summary in hparams(plain, metrics):
            self.writer._get_file_writer().add_summary(summary)

    def close(self) -> None:
        self.bar.close()
        writer, self.writer = self.writer, None  # closing twice (an error during the first close) does nothing
        if writer is not None:
            writer.close()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.1}}`` -> ``{"optimizer.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def hparams_first(params: dict[str, Any], first: Sequence[str] = ()) -> dict[str, Any]:
    """The HParams tab's columns: ``first`` (a sweep's keys), then every key the config sets.

    A key still at its built-in default is left out (the whole config is in the "config"
    text entry), so the tab opens on what varies between runs, not on ~60 unset options.
    """
    import dataclasses

    from trainer.config import CompareConfig, DataConfig, LogConfig, TrainConfig

    data = {k: v for k, v in dataclasses.asdict(DataConfig("")).items() if k not in ("name", "kwargs")}
    defaults = flatten({"seed": 0, "imports": [], "layers": {"default": "native"}, "scheduler": None, "data": data,
                        "train": dataclasses.asdict(TrainConfig()), "log": dataclasses.asdict(LogConfig()),
                        "compare": dataclasses.asdict(CompareConfig())})
    out = {k: params[k] for k in first if k in params}
    out.update((k, v) for k, v in params.items() if k not in out and (k not in defaults or defaults[k] != v))
    return out
