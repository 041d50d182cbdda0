"""Stop signals while training: the first finishes the step, saves and stops; a second stops at once.

SIGINT (Ctrl-C), SIGTERM (slurm, systemd) and SIGUSR1 (slurm's pre-emption warning,
``--signal=USR1@SECONDS``) all stop a run this way. Clusters signal every process of a job,
so more signals often follow the first one; two rules keep such a storm harmless:

- A second signal that arrives while the main process is receiving a batch from a DataLoader
  worker waits until the batch is in. Batches come through shared memory whose file descriptor
  a worker's ``multiprocessing.resource_sharer`` thread hands over a socket; abandoning that
  hand-over halfway makes the worker print a traceback (``BrokenPipeError`` in ``_serve``).
  A third signal during the same hand-over stops at once anyway (a worker that hangs).
- Once the run is stopping (``Interrupted`` or ``InterruptedTwice`` raised), further signals
  change nothing, so the clean-up (the event file, the checkpoint writer) completes and the
  stop's own exit code stands.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGUSR1 arrived; the current step finished and a checkpoint was saved."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved")


class InterruptedTwice(KeyboardInterrupt):
    """A second stop signal arrived before the first one's checkpoint was saved: stopped at once."""

    def __init__(self, signum: int, first: int):
        self.signum, self.first = signum, first
        super().__init__(f"interrupted twice by {signal.Signals(signum).name}; stopped without saving")


class Stops:
    """The stop signals of one ``fit``: which came first, and whether the run is already stopping."""

    def __init__(self) -> None:
        self.first: int | None = None   # the first stop signal; the loop saves and stops after its step
        self._receiving = False         # the main thread is taking a batch from a worker
        self._deferred: int | None = None
        self._over = False              # Interrupted or InterruptedTwice was raised

    def handler(self, signum: int, frame) -> None:
        if self._over:
            return
        if self.first is None:
            self.first = signum
        elif self._receiving and self._deferred is None:
            self._deferred = signum  # raised by ``received`` once the batch is in
        else:
            raise self.twice(signum)

    def twice(self, signum: int) -> InterruptedTwice:
        self._over = True
        return InterruptedTwice(signum, self.first)

    def interrupted(self) -> Interrupted:
        """The exception that ends the run after the first signal's checkpoint; later signals are ignored."""
        self._over = True
        return Interrupted(self.first or signal.SIGTERM)  # under DDP the signal may have come to another rank

    @contextlib.contextmanager
    def installed(self):
        """The handler for every stop signal (main thread only), the previous handlers restored after."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self.handler) for s in SIGNALS}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def received(self, loader: Iterable[T]) -> Iterator[T]:
        """``iter(loader)``; with worker processes, a second signal waits until each batch is fully received."""
        if not getattr(loader, "num_workers", 0):
            return iter(loader)  # nothing crosses a process boundary: nothing to guard, nothing to pay
        return self._guarded(iter(loader))

    def _guarded(self, batches: Iterator[T]) -> Iterator[T]:
        end = object()
        while True:
            self._receiving = True
            try:
                batch = next(batches, end)
            finally:
                self._receiving = False
            if self._deferred is not None:
                raise self.twice(self._deferred)
            if batch is end:
                return
            yield batch
