"""Checkpoints written off the training step: the same bytes, kill -9 mid-write, failing writers, the run lock."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import QUICKSTART, ROOT
import faulty_writer
from trainer import Trainer, checkpoint, disk, load_config
from trainer.cli import main
from trainer.snapshot import HostBuffers

# dropout, Adam and a scheduler: every piece of state a resume has to restore
RUN = ["model={name: mlp, in_features: 10, out_features: 1, hidden: [32, 32], dropout: 0.1}",
       "optimizer={name: adam, lr: 0.003}", "scheduler={name: cosine, warmup_steps: 20}",
       "data.batch_size=16", "train.max_epochs=6"]  # 52 steps an epoch, 312 in all
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",  # the threads of this process
       "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def serialized(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def run_args(log_dir, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "trainer", "run", str(QUICKSTART), f"log.dir={log_dir}", "log.progress=false",
            *RUN, *overrides]


def resume_args(args: list[str], run_dir) -> list[str]:
    return args[:5] + ["--resume", str(run_dir)] + args[5:]


def last_step(run_dir) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "manifest.json").read_text())["last"]["step"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def temporary_files(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob(".*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final weights of the same run, never interrupted."""
    cfg = load_config(QUICKSTART, [f"log.dir={tmp_path_factory.mktemp('ref')}", "log.progress=false", *RUN])
    trainer = Trainer(cfg)
    trainer.fit()
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- the snapshot ---------------------------------------------------------------------------

def test_host_copy_writes_the_same_bytes_and_shares_nothing_with_the_live_state():
    w = torch.randn(4, 3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 3))
    model[1].weight = torch.nn.Parameter(model[0].weight.t())  # tied: one storage, two views
    state = {"model": model.state_dict(), "view": w[1:3, ::2], "w": w, "list": [w, 1.5, "x", None],
             "tuple": (torch.tensor(3), True), "rng": checkpoint.rng_state()}
    copy = checkpoint.host_copy(state)
    assert type(copy["model"]) is collections.OrderedDict and copy["model"]._metadata == state["model"]._metadata
    assert serialized(copy) == serialized(state)  # storages shared exactly as before, views kept as views
    with torch.no_grad():
        model[0].weight.add_(1.0)
        w.mul_(2.0)
    assert serialized(copy) != serialized(state)
    assert not torch.equal(copy["w"], w) and copy["view"].data_ptr() != w.data_ptr()


class Overlapped(Trainer):
    """Counts the steps trained while a (slowed) checkpoint write was in flight."""

    overlapped = 0

    def train_step(self, batches):
        Overlapped.overlapped += self.checkpoints.writing
        return super().train_step(batches)


def faulty(monkeypatch, **env) -> None:
    """Checkpoint writes go through ``faulty_writer``, here and in the writer process, as ``env`` says."""
    for name, value in env.items():
        monkeypatch.setenv(f"FAULTY_WRITER_{name.upper()}", str(value))
    monkeypatch.setattr(disk, "atomic_write", faulty_writer.wrap(disk.atomic_write))
    monkeypatch.setattr(checkpoint, "WRITER_SCRIPT", Path(faulty_writer.__file__))


def test_an_asynchronous_checkpoint_is_bit_identical_to_a_synchronous_one(tmp_path, monkeypatch):
    faulty(monkeypatch, seconds=0.02)  # training goes on while a write sleeps: what it changes must not reach the file
    runs = {}
    for background in (True, False):
        cfg = load_config(QUICKSTART, [f"log.dir={tmp_path}", "log.progress=false", *RUN,
                                       "train.max_epochs=2", "train.checkpoint_every=5", "train.keep_checkpoints=100",
                                       f"train.async_checkpoint={background}"])
        runs[background] = Overlapped(cfg).fit().run_dir / "checkpoints"
    assert Overlapped.overlapped > 10  # the writes did overlap training
    names = sorted(p.name for p in runs[True].glob("step_*.pt"))
    assert len(names) == 22 and names == sorted(p.name for p in runs[False].glob("step_*.pt"))
    for name in names + ["last.pt"]:
        a, b = (torch.load(run / name, weights_only=True) for run in (runs[True], runs[False]))
        a["config"], b["config"] = yaml.safe_load(a["config"]), yaml.safe_load(b["config"])  # the config.yaml text
        assert a["config"]["train"].pop("async_checkpoint") and not b["config"]["train"].pop("async_checkpoint")
        assert serialized(a) == serialized(b), name  # every tensor, bit for bit, and every other value
    manifests = [json.loads((run / "manifest.json").read_text()) for run in runs.values()]
    assert manifests[0]["last"]["step"] == manifests[1]["last"]["step"] == 104


# --- kill -9 -------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_at_random_moments_of_asynchronous_writes_always_leaves_a_bit_exact_resume(tmp_path, reference):
    """Eight kills at random moments of a run that writes a checkpoint every other step, each followed by a resume."""
    args = run_args(tmp_path, "train.checkpoint_every=2", "train.keep_checkpoints=2")
    run_dir = tmp_path / "quickstart" / "version_0"
    rng = random.Random(16)
    killed_mid_write = 0
    for i in range(8):
        before = last_step(run_dir)
        # the kill comes a few writes past the last one, and a random moment later: steps, not seconds, set
        # how far a run gets, so a fast machine cannot finish all 312 steps before the eighth kill
        target = max(before, 0) + rng.randrange(2, 30, 2)
        proc = subprocess.Popen(args if i == 0 else resume_args(args, run_dir), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
        wait_for(lambda: last_step(run_dir) >= target, proc)  # it trains and writes
        time.sleep(rng.uniform(0.0, 0.01))
        proc.kill()
        proc.communicate()
        killed_mid_write += bool(temporary_files(run_dir))
        state, path, problems = checkpoint.Checkpoints(run_dir).load()  # the newest complete one verifies
        assert problems == [] and state["step"] >= before, problems
    resumed = subprocess.run(resume_args(args, run_dir), capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert temporary_files(run_dir) == []  # what the kills left mid-write was removed
    assert_bit_equal(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"], reference)
    print(f"{killed_mid_write} of 8 kills left a write unfinished")


# --- signals and failing writers ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("group", [False, True], ids=["process", "process-group"])
def test_sigint_while_a_write_is_in_flight_exits_130_with_both_checkpoints_complete(tmp_path, group):
    """To the process, or to its whole process group as Ctrl-C at a terminal sends it."""
    log = tmp_path / "writes.log"
    args = run_args(tmp_path, "imports=[faulty_run]", "train.checkpoint_every=10")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**ENV, "FAULTY_WRITER_LOG": str(log), "FAULTY_WRITER_SECONDS": "2.0"})
    wait_for(log.exists, proc)  # the first checkpoint's write has begun and takes two seconds
    if group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    run = tmp_path / "quickstart" / "version_0"
    assert err.strip().splitlines() == [f"error: interrupted by SIGINT; checkpoint saved [run directory {run}; "
                                        f"to resume: trainer run --resume {run}]"]
    ckpts = run / "checkpoints"
    manifest = json.loads((ckpts / "manifest.json").read_text())
    stop = manifest["last"]["step"]
    # the loop saves at the step the signal ends, or, on a busy machine, at step 20, where the loop
    # waited for the first write; either way after the write in flight, and not before it ended
    assert sorted(manifest["files"]) == ["step_00000010.pt", f"step_{stop:08d}.pt"] and 10 < stop <= 20
    for name, entry in manifest["files"].items():
        assert isinstance(checkpoint.verify(ckpts / name, entry["sha256"]), dict), name
    assert torch.load(ckpts / "last.pt", weights_only=True)["step"] == stop


@pytest.mark.slow
def test_kill_9_of_the_training_process_kills_its_writer_process_mid_write(tmp_path):
    """No write goes on behind the back of a resume that follows."""
    log = tmp_path / "writes.log"
    args = run_args(tmp_path, "imports=[faulty_run]", "train.checkpoint_every=10")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "FAULTY_WRITER_LOG": str(log), "FAULTY_WRITER_SECONDS": "5.0"})
    wait_for(log.exists, proc)  # the writer process has the first checkpoint and sleeps five seconds before writing
    name, pid = log.read_text().split()
    assert name == "step_00000010.pt" and int(pid) != proc.pid
    proc.kill()
    proc.communicate()
    end = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < end, "the writer process outlived the training process"
        time.sleep(0.01)
    time.sleep(6)  # past the moment its write would have ended
    assert not (tmp_path / "quickstart" / "version_0" / "checkpoints" / "step_00000010.pt").exists()


def small_state(step: int, **extra) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "scaler": {}, "step": step, "epoch": 0,
            "batch_in_epoch": step, "rng": {}, **extra}


def test_a_state_torch_save_refuses_is_one_error_and_the_writer_process_takes_the_next_save(tmp_path):
    ckpts = checkpoint.Checkpoints(tmp_path)
    ckpts.save(small_state(1), 1)
    ckpts.save(small_state(2, bad=lambda: 0), 2)  # the snapshot keeps it; pickling it fails half way
    with pytest.raises(checkpoint.CheckpointError, match=r"could not write checkpoint \S+step_00000002.pt \("
                                                         r"(AttributeError|PicklingError): .*; stopped"):
        ckpts.wait()
    ckpts.save(small_state(3), 3)
    ckpts.close()
    state, path, problems = checkpoint.Checkpoints(tmp_path).load()
    assert state["step"] == 3 and problems == [] and temporary_files(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000001.pt",
                                                                                 "step_00000003.pt"]


def test_a_writer_process_that_dies_stops_the_run_with_one_error_at_the_next_save(tmp_path):
    ckpts = checkpoint.Checkpoints(tmp_path)
    ckpts.save(small_state(1), 1)
    ckpts.wait()
    ckpts._process.proc.kill()
    ckpts.save(small_state(2), 2)
    with pytest.raises(checkpoint.CheckpointError, match=r"^the checkpoint writer process ended \(exit code -9\); "
                                                         r"stopped, the checkpoints it wrote before are kept$"):
        ckpts.wait()
    ckpts.close()
    assert checkpoint.Checkpoints(tmp_path).load()[0]["step"] == 1


def test_a_writer_process_that_cannot_start_is_one_error_line_suggesting_synchronous_saves(tmp_path, monkeypatch,
                                                                                            capsys):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    code = main(["run", str(QUICKSTART), f"log.dir={tmp_path}", "log.progress=false", *RUN, "train.checkpoint_every=5"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("error: could not start the checkpoint writer process (FileNotFoundError: ") and \
        "set train.async_checkpoint: false to write checkpoints in the training process" in err
    assert not (tmp_path / "quickstart" / "version_0" / "checkpoints").exists()


@pytest.mark.slow
def test_a_run_whose_dataloader_workers_were_forked_after_the_writer_started_ends(tmp_path):
    """Persistent validation workers forked after the first save hold the writer's stdin open: fit still ends."""
    run = subprocess.run(run_args(tmp_path, "data.num_workers=1", "train.checkpoint_every=5", "train.max_epochs=2"),
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert run.returncode == 0, run.stderr
    assert last_step(tmp_path / "quickstart" / "version_0") == 104


@pytest.mark.parametrize("background", [True, False], ids=["async", "sync"])
def test_a_full_disk_stops_the_run_with_one_error_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                           capsys, background):
    faulty(monkeypatch, full_after=2)
    code = main(["run", str(QUICKSTART), f"log.dir={tmp_path}", "log.progress=false", *RUN,
                 "train.checkpoint_every=5", f"train.async_checkpoint={background}"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("error: could not write checkpoint ") and "step_00000015.pt (OSError: [Errno 28] No " \
        "space left on device); stopped, the checkpoint of step 10 is kept" in err
    ckpts = tmp_path / "quickstart" / "version_0" / "checkpoints"
    state, path, problems = checkpoint.Checkpoints(ckpts.parent).load()
    assert state["step"] == 10 and path.name == "step_00000010.pt" and problems == []
    assert temporary_files(ckpts.parent) == [] and not (ckpts / "step_00000015.pt").exists()


@pytest.mark.slow
def test_a_writer_failing_in_a_real_run_stops_it_at_the_next_step_with_one_error_line(tmp_path):
    """The checkpoint's temporary file cannot be created (a folder is in its place): the run stops, exit 1."""
    args = run_args(tmp_path, "data.n_samples=100000", "train.max_steps=3000", "train.max_epochs=null",
                    "train.checkpoint_every=100")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    ckpts = tmp_path / "quickstart" / "version_0" / "checkpoints"
    wait_for((ckpts.parent / "config.yaml").exists, proc)  # its run directory, made at the start of fit
    for step in range(200, 3001, 100):  # long before the run gets there: every write after the first fails
        (ckpts / f".step_{step:08d}.pt.tmp{proc.pid}").mkdir(parents=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.startswith(f"error: could not write checkpoint {ckpts / 'step_00000200.pt'} (IsADirectoryError: ")
    assert err.strip().endswith(f"stopped, the checkpoint of step 100 is kept [run directory {ckpts.parent}; "
                                f"to resume: trainer run --resume {ckpts.parent}]")
    assert len(err.strip().splitlines()) == 1
    state, path, problems = checkpoint.Checkpoints(ckpts.parent).load()
    assert state["step"] == 100 and problems == []
    assert torch.load(ckpts / "last.pt", weights_only=True)["step"] == 100


# --- the run-directory lock and leftovers ------------------------------------------------------------

@pytest.mark.slow
def test_a_second_resume_of_a_run_in_training_is_one_error_line_naming_the_holder(tmp_path):
    args = run_args(tmp_path, "data.n_samples=100000", "train.max_steps=100000", "train.max_epochs=null",
                    "train.checkpoint_every=10")
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    run_dir = tmp_path / "quickstart" / "version_0"
    try:
        wait_for(lambda: last_step(run_dir) > 0, first)
        second = subprocess.run(resume_args(args, run_dir), capture_output=True, text=True, env=ENV, timeout=120)
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr == f"error: --resume: {run_dir} is in use by process {first.pid}, which is training " \
                                "in it (wait for that process to end, or stop it)\n"
        assert first.poll() is None  # the first goes on
    finally:
        first.kill()
        first.communicate()
    assert checkpoint.lock_run_dir(run_dir) is not None  # kill -9 released it


def test_the_lock_is_held_from_resume_to_the_end_of_fit(tmp_path, quick):
    run = Trainer(quick("train.max_steps=3")).fit()
    trainer = Trainer(quick("train.max_steps=6"), resume=run.run_dir)
    with pytest.raises(Exception, match=f"is in use by process {os.getpid()}"):
        checkpoint.lock_run_dir(run.run_dir)
    trainer.fit()
    checkpoint.lock_run_dir(run.run_dir).close()


def test_resume_removes_what_a_killed_writer_left_and_never_reads_it(tmp_path, quick, capsys):
    run = Trainer(quick("train.max_steps=4", "train.checkpoint_every=2")).fit()
    ckpts = run.run_dir / "checkpoints"
    good = (ckpts / "step_00000004.pt").read_bytes()
    leftovers = [ckpts / ".step_00000006.pt.tmp4242", ckpts / ".manifest.json.tmp4242", ckpts / ".last.pt.tmp17"]
    leftovers[0].write_bytes(good[: len(good) // 2])  # a half-written newer checkpoint
    leftovers[1].write_text('{"files": {}, "last": {"file": ".step_00000006.pt.tmp4242", "step": 6}}')
    leftovers[2].write_bytes(b"\0" * 100)
    trainer = Trainer(quick("train.max_steps=8"), resume=run.run_dir, report=True)
    assert trainer.step == 4 and not any(p.exists() for p in leftovers)
    trainer.fit()
    assert "resuming from step 4 (epoch 0); removed 3 temporary files a killed process left (never read)\n" in (
        capsys.readouterr().out)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "manifest.json", "step_00000002.pt",
                                                       "step_00000004.pt", "step_00000008.pt"]


def test_huge_but_finite_weights_pass_the_check_before_a_save_and_an_inf_does_not(quick):
    """The check sums the weights first; a sum that overflows is looked at element by element."""
    from trainer.loop import NonFiniteLoss

    trainer = Trainer(quick("train.max_steps=1"))
    with torch.no_grad():
        trainer.model.weight.fill_(3e38)  # each finite, their sum is inf
    trainer.check_finite(weights=True)
    with torch.no_grad():
        trainer.model.weight[0, 3] = float("inf")
    with pytest.raises(NonFiniteLoss, match="the weights are nan by step 0"):
        trainer.check_finite(weights=True)


def test_snapshots_reuse_the_previous_ones_host_memory_and_still_hold_the_state_of_their_moment():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 3))
    model[1].weight = torch.nn.Parameter(model[0].weight.t())  # tied: one storage, two views
    buffers = HostBuffers()
    first = buffers.take({"model": model.state_dict()})
    assert serialized(first) == serialized({"model": model.state_dict()})
    storages = {t.untyped_storage().data_ptr() for t in first["model"].values()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[0].bias = torch.nn.Parameter(torch.zeros(5))  # a new storage of another size: not reused
    second = buffers.take({"model": model.state_dict()})
    assert serialized(second) == serialized({"model": model.state_dict()})
    assert second["model"]["0.weight"].untyped_storage().data_ptr() in storages  # the same host memory, new values
    assert second["model"]["0.bias"].untyped_storage().data_ptr() not in storages
    assert second["model"]["1.weight"].untyped_storage().data_ptr() == second["model"]["0.weight"].data_ptr()


def test_one_writer_thread_and_process_serve_every_background_save_and_end_with_close(tmp_path):
    def writers():
        return [t for t in threading.enumerate() if t.name.startswith("checkpoint-writer")]

    ckpts = checkpoint.Checkpoints(tmp_path, keep=2)
    idents, pids = set(), set()
    for step in range(1, 5):
        ckpts.save({"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "scaler": {}, "step": step,
                    "epoch": 0, "batch_in_epoch": step, "rng": {}}, step)
        idents |= {t.ident for t in writers()}
        pids.add(ckpts._process.proc.pid)
    ckpts.wait()
    process = ckpts._process.proc
    assert len(idents) == 1 and writers() and len(pids) == 1 and process.poll() is None
    ckpts.close()
    assert not writers() and process.returncode == 0  # it ended when told, not killed
    state, path, problems = checkpoint.Checkpoints(tmp_path).load()
    assert state["step"] == 4 and torch.equal(state["model"]["w"], torch.full((3,), 4.0)) and problems == []
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000003.pt", "step_00000004.pt"]


@pytest.mark.parametrize("keys", [("model",), ("model", "optimizer", "step")], ids=["model-only", "no-rng"])
def test_a_checkpoint_that_verifies_but_lacks_keys_is_one_error_line_naming_the_file_and_keys(tmp_path, quick, keys):
    """A file saved by hand (its sha256 put in the manifest, so it verifies) that cannot resume a run."""
    run = Trainer(quick("train.max_steps=2")).fit()
    ckpts = run.run_dir / "checkpoints"
    full = torch.load(ckpts / "last.pt", weights_only=True)
    for p in ckpts.glob("*.pt"):
        p.unlink()
    data = serialized({k: full[k] for k in keys})
    (ckpts / "step_00000002.pt").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (ckpts / "manifest.json").write_text(json.dumps({"files": {"step_00000002.pt": {"step": 2, "sha256": digest}},
                                                     "last": {"file": "step_00000002.pt", "step": 2,
                                                              "sha256": digest}}))
    proc = subprocess.run([sys.executable, "-m", "trainer", "run", "--resume", str(run.run_dir)], capture_output=True,
                          text=True, env=ENV, timeout=300)
    missing = [k for k in checkpoint.REQUIRED if k not in keys]
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: --resume: no usable checkpoint in {ckpts}: checkpoints/step_00000002.pt "
                                  f"lacks the keys {', '.join(missing)}"), proc.stderr
