"""Faults injected for real: signals and kill -9 at random steps, damaged checkpoints, NaN through a user layer."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import planted_layers  # noqa: F401  registers the poisoned layer and the marked dataset
from conftest import QUICKSTART, StopAt
from trainer import Trainer, load_config
from trainer.cli import main

RESUMABLE = ["model={name: mlp, in_features: 10, out_features: 1, hidden: [32, 32], dropout: 0.1}",
             "optimizer={name: adam, lr: 0.003}", "scheduler={name: cosine, warmup_steps: 20}",
             "data.batch_size=16", "train.max_epochs=10", "train.checkpoint_every=7"]


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run, never interrupted."""
    cfg = load_config(QUICKSTART, [f"log.dir={tmp_path_factory.mktemp('ref')}", "log.progress=false", *RESUMABLE])
    trainer = Trainer(cfg)
    trainer.fit()
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def newest_step(run_dir) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "manifest.json").read_text())["last"]["step"]
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["INT", "TERM", "KILL"])
def test_killed_at_a_random_step_then_resumed_ends_bit_identical(tmp_path, uninterrupted, sig):
    args = [sys.executable, "-m", "trainer", "run", str(QUICKSTART), f"log.dir={tmp_path}", "log.progress=false",
            *RESUMABLE]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # the same threads as this process
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    run_dir = tmp_path / "quickstart" / "version_0"
    target = random.Random(int(sig)).randrange(10, 250)  # total: 520 steps
    while newest_step(run_dir) < target:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[sig], err
    stopped = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 0 < stopped < 520
    resumed = subprocess.run(args[:4] + ["--resume", str(run_dir)] + args[4:], capture_output=True, text=True,
                             env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_bit_equal(final_weights(run_dir), uninterrupted)


def interrupted_run(tmp_path, at: int):
    cfg = load_config(QUICKSTART, [f"log.dir={tmp_path}", "log.progress=false", *RESUMABLE])
    trainer = StopAt(cfg)
    trainer.at = at
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    return cfg, trainer.run_dir


def truncate(path) -> None:
    data = path.read_bytes()
    with open(path, "r+b") as f:  # in place: last.pt, a hard link to the same file, is damaged too
        f.truncate(len(data) // 2)


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    with open(path, "r+b") as f:
        f.write(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_a_byte], ids=["truncated", "bit-flip"])
def test_damaged_newest_checkpoint_is_detected_and_resume_uses_the_newest_good(tmp_path, uninterrupted, damage,
                                                                                 capsys):
    cfg, run_dir = interrupted_run(tmp_path, at=40)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == ["step_00000028.pt", "step_00000035.pt",
                                                               "step_00000040.pt"]  # the newest three
    damage(ckpts / "step_00000040.pt")
    trainer = Trainer(cfg, resume=run_dir)
    warning = capsys.readouterr().err
    assert "step_00000040.pt" in warning and "step_00000035.pt (step 35), the newest good checkpoint" in warning
    assert trainer.step == 35
    trainer.fit()
    assert_bit_equal(trainer.model.state_dict(), uninterrupted)


def test_nan_through_a_user_layer_stops_naming_the_step_and_the_layer(tmp_path, capsys):
    cfg = {"name": "nan", "imports": ["planted_layers"], "model": {"name": "poisoned_mlp"},
           "layers": {"default": "custom"}, "loss": {"name": "mse"}, "optimizer": {"name": "sgd", "lr": 0.01},
           "data": {"name": "marked"}, "train": {"max_epochs": 3, "checkpoint_every": 2},
           "log": {"dir": str(tmp_path), "progress": False}}
    path = tmp_path / "nan.yaml"
    path.write_text(json.dumps(cfg))
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the weights are nan by step 4;") and len(err.splitlines()) == 1
    assert "layer 0 (poisoned, custom) got a non-finite grad for weight at step 4" in err
    assert err.endswith(f"[run directory {tmp_path / 'nan' / 'version_0'}; "
                        f"to resume: trainer run --resume {tmp_path / 'nan' / 'version_0'}]")
    ckpts = tmp_path / "nan" / "version_0" / "checkpoints"
    state = torch.load(ckpts / "last.pt", weights_only=True)  # the last good one
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "evil" / "version_0"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"model": {}, "optimizer": {}, "step": 1, "payload": planted_layers.Cube()},
               run_dir / "checkpoints" / "last.pt")
    assert main(["run", str(QUICKSTART), "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: no usable checkpoint") and len(err.strip().splitlines()) == 1
    assert "holds Python objects that torch.load(weights_only=True) refuses" in err


def test_resume_with_a_different_model_is_a_config_error(tmp_path, capsys):
    run = Trainer(load_config(QUICKSTART, [f"log.dir={tmp_path}", "train.max_steps=2"])).fit()
    assert main(["run", "--resume", str(run.run_dir), "model.name=mlp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the checkpoint does not fit this config") and "config.yaml" in err


def test_keeps_the_newest_k_and_links_last(tmp_path):
    run = Trainer(load_config(QUICKSTART, [f"log.dir={tmp_path}", "train.max_steps=20", "train.max_epochs=null",
                                           "train.checkpoint_every=2", "train.keep_checkpoints=3"])).fit()
    ckpts = run.run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "manifest.json", "step_00000016.pt",
                                                       "step_00000018.pt", "step_00000020.pt"]
    assert (ckpts / "last.pt").read_bytes() == (ckpts / "step_00000020.pt").read_bytes()
    manifest = json.loads((ckpts / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["step_00000016.pt", "step_00000018.pt", "step_00000020.pt"]


def test_early_stopping_and_best_checkpoint(tmp_path, capsys):
    overrides = [f"log.dir={tmp_path}", "train.max_epochs=20", "train.monitor=val/loss", "train.patience=2",
                 "train.min_delta=1000"]  # nothing after the first check counts as an improvement
    assert main(["run", str(QUICKSTART), *overrides]) == 0
    out = capsys.readouterr().out
    # 3 validations, one per epoch
    assert "  stopped: early stopping (val/loss did not improve for 2 checks) at step 39, 3 full epochs" in out
    ckpts = tmp_path / "quickstart" / "version_0" / "checkpoints"
    assert torch.load(ckpts / "best.pt", weights_only=True)["step"] == 13
    assert torch.load(ckpts / "last.pt", weights_only=True)["step"] == 39
