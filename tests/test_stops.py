"""Stops the way clusters stop jobs: signals to the whole process group, twice, early; and the stop messages."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import QUICKSTART, StopAt
from torch.utils.data import DataLoader, Dataset
from trainer import Callback, Trainer, cli
from trainer.loop import Interrupted, InterruptedTwice, NonFiniteLoss
from trainer.signals import Stops

LONG = ["log.progress=false", "train.max_epochs=1000", "log.every=5"]


def start(tmp_path, *overrides: str) -> subprocess.Popen:
    """``trainer run`` as the leader of its own process group, as slurm and systemd start a job."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "trainer", "run", str(QUICKSTART), f"log.dir={tmp_path}", *LONG,
                             *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def newest_step(run_dir) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "manifest.json").read_text())["last"]["step"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_for_a_checkpoint(proc, run_dir) -> None:
    deadline = time.time() + 120
    while newest_step(run_dir) < 0:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 138)],
                         ids=["TERM", "INT", "USR1"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_signal_to_the_process_group_finishes_the_step_saves_and_exits_with_its_code(tmp_path, sig, code,
                                                                                       workers):
    proc = start(tmp_path, f"data.num_workers={workers}", "train.checkpoint_every=1000000")
    run_dir = tmp_path / "quickstart" / "version_0"
    wait_for_a_checkpoint(proc, run_dir)  # the first epoch end: workers are running
    time.sleep(0.5)
    before = newest_step(run_dir)
    os.killpg(proc.pid, sig)  # every process of the group, DataLoader workers included
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip() == (f"error: interrupted by {sig.name}; checkpoint saved [run directory {run_dir}; "
                           f"to resume: trainer run --resume {run_dir}]"), err
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert last["step"] == newest_step(run_dir) > before  # saved at the stop step, not at an epoch end


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_more_signals_while_stopping_still_exit_with_the_code_not_by_signal(tmp_path, sig, code):
    proc = start(tmp_path, "data.num_workers=2")
    wait_for_a_checkpoint(proc, tmp_path / "quickstart" / "version_0")
    while proc.poll() is None:  # a signal every 20 ms until it ends: before, during and after the save
        os.killpg(proc.pid, sig)
        time.sleep(0.02)
    err = proc.stderr.read()
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: interrupted")


class Slow(Dataset):
    """Each sample takes ``SLOW`` seconds in the worker, so the main process waits on every batch."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        time.sleep(SLOW)
        return torch.full((4096,), float(i))


SLOW = 0.5


def signals_after(*delays: float) -> None:
    """Real SIGINTs to the main thread, ``delays`` seconds from now: they interrupt its wait for the worker."""
    for d in delays:
        threading.Timer(d, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()


@pytest.mark.parametrize("count", [2, 3])
def test_a_second_signal_while_a_batch_comes_from_a_worker_waits_for_it_and_a_third_does_not(count):
    """Abandoning a batch halfway through its hand-over from a worker makes the worker print a traceback."""
    stops = Stops()
    with stops.installed():
        loader = DataLoader(Slow(), batch_size=1, num_workers=1, persistent_workers=True)  # as the trainer's
        batches = stops.received(loader)  # (the worker's shutdown then is not part of the time measured)
        assert int(next(batches)[0, 0]) == 0  # the next batch is SLOW seconds away
        started = time.perf_counter()
        signals_after(*[0.05 * (i + 1) for i in range(count)])
        with pytest.raises(InterruptedTwice):
            next(batches)
        waited = time.perf_counter() - started
    if count == 2:
        assert waited > SLOW * 0.6, waited  # the second signal waited for the batch
    else:
        assert waited < SLOW * 0.6, waited  # the third one did not: a hung worker cannot hold the stop up
    assert stops.first == signal.SIGINT


class ResignalOnError(Callback):
    """More SIGINTs while the run is cleaning up after its stop."""

    def __init__(self):
        self.cleaned_up, self.escaped = False, None

    def on_error(self, trainer, error):
        try:
            for _ in range(3):
                signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt as e:  # (caught so that a failure here does not end the test session)
            self.escaped = e
        self.cleaned_up = True


def test_more_signals_during_the_clean_up_after_a_stop_change_nothing(quick):
    watcher = ResignalOnError()
    t = StopAt(quick("train.max_steps=50"), callbacks=[watcher])
    t.at = 5
    with pytest.raises(Interrupted) as e:
        t.fit()
    assert watcher.cleaned_up and watcher.escaped is None and e.value.signum == signal.SIGINT
    assert t.log.writer is None  # the event file was closed


def test_a_signal_while_a_stop_unwinds_outside_the_loop_is_ignored():
    """The command's own handler (loading, building, between runs) does not replace a stop that is ending the run."""
    old = signal.signal(signal.SIGINT, cli._stop)
    try:
        try:
            raise Interrupted(signal.SIGTERM)
        except KeyboardInterrupt:
            try:
                signal.raise_signal(signal.SIGINT)  # ignored: the process already ends with SIGTERM's code
            except cli.Stopped:
                pytest.fail("a signal replaced the stop that was unwinding")
        with pytest.raises(cli.Stopped):
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, old)


SWALLOWING_IMPORT = """
import signal
try:  # as some libraries guard an optional import: a bare except
    signal.raise_signal(signal.SIGINT)
except BaseException:
    pass
"""


def test_a_signal_during_an_import_stops_once_the_import_is_over(tmp_path, monkeypatch):
    """An exception raised inside an import can be swallowed (as here) or leave a C extension half-loaded."""
    (tmp_path / "swallowing_module.py").write_text(SWALLOWING_IMPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    old = signal.signal(signal.SIGINT, cli._stop)
    try:
        with pytest.raises(cli.Stopped):
            import swallowing_module  # noqa: F401
            time.sleep(2)  # the signal comes back once the import is over
    finally:
        signal.signal(signal.SIGINT, old)
        sys.modules.pop("swallowing_module", None)


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 0.6, 1.5, 3.0])
def test_a_signal_while_loading_or_building_is_one_error_line(tmp_path, delay):
    proc = start(tmp_path, "data.num_workers=2")
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if proc.returncode == 130:  # still loading or building when the signal came (the usual case)
        assert err.startswith("error: interrupted by SIGINT"), err
        assert "twice" not in err
    else:  # a fast machine was already training
        assert proc.returncode == 130, err


def poisoned_trainer(quick, *overrides: str, every: int | None = None):
    t = Trainer(quick("train.max_steps=20", *overrides))
    real, calls = t.loss_fn, []

    def loss(out, y):
        calls.append(1)
        bad = every is not None and len(calls) >= every
        return real(out, y) * (float("nan") if bad else 1.0)

    t.loss_fn = loss
    return t


def test_non_finite_loss_before_any_checkpoint_does_not_claim_one_is_kept(quick):
    with pytest.raises(NonFiniteLoss) as e:
        poisoned_trainer(quick, "log.every=5", every=2).fit()
    assert "no checkpoint had been saved yet" in str(e.value) and "last good checkpoint" not in str(e.value)
    assert "set train.skip_nonfinite: true" in str(e.value)


def test_non_finite_loss_after_a_checkpoint_says_it_is_kept(quick):
    with pytest.raises(NonFiniteLoss) as e:
        poisoned_trainer(quick, "log.every=5", "train.checkpoint_every=2", every=4).fit()
    assert "the last good checkpoint is kept" in str(e.value)


def test_skip_nonfinite_that_skipped_a_whole_log_window_fails_without_suggesting_itself(quick):
    with pytest.raises(NonFiniteLoss) as e:
        poisoned_trainer(quick, "log.every=5", "train.skip_nonfinite=true", every=1).fit()
    assert "every one of the 5 steps up to step 5" in str(e.value) and "skip_nonfinite" not in str(e.value)


@pytest.mark.slow
def test_skip_nonfinite_with_every_loss_nan_exits_1_with_one_error_line(tmp_path):
    from conftest import run_cli

    proc = run_cli("run", str(QUICKSTART), f"log.dir={tmp_path}", "log.progress=false", "train.max_steps=20",
                   "train.skip_nonfinite=true", "optimizer.lr=1e30", "log.every=5")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: every one of the") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.slow
def test_a_process_ends_while_its_workers_are_alive(tmp_path):
    """Workers ignore SIGTERM from others, yet obey their parent's: exiting with live persistent workers ends."""
    script = (f"from trainer import Trainer, load_config\n"
              f"cfg = load_config({str(QUICKSTART)!r}, ['log.dir={tmp_path}', 'log.progress=false',"
              f" 'data.num_workers=2', 'train.max_steps=3'])\n"
              f"t = Trainer(cfg)\nt.fit()\nnext(iter(t.train_loader))\n")  # workers alive at exit
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
