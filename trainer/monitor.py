"""The metric a run watches: which checkpoint is best, and when to stop early."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Monitor:
    """Tracks ``metric`` (``val/loss``, ...) for ``best.pt`` and early stopping.

    Args:
        metric: the metric's tag, or None for no monitoring.
        mode: ``min`` or ``max``: which direction is better.
        min_delta: an improvement smaller than this does not count.
        patience: checks without improvement before ``exhausted`` (None: never).
    """

    metric: str | None
    mode: str = "min"
    min_delta: float = 0.0
    patience: int | None = None
    best: float | None = None
    bad_checks: int = 0

    def update(self, values: dict[str, float]) -> bool:
        """Record a check if ``values`` holds the metric; True when it improved on the best so far."""
        if self.metric is None or self.metric not in values:
            return False
        value = values[self.metric]
        if self.best is None or (value < self.best - self.min_delta if self.mode == "min"
                                 else value > self.best + self.min_delta):
            self.best, self.bad_checks = value, 0
            return True
        self.bad_checks += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.patience is not None and self.bad_checks >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_checks": self.bad_checks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_checks = state["best"], state["bad_checks"]
