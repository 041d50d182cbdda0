"""What `trainer run` tells its user, in real subprocesses with stdout a pipe: the start line,
progress lines, the summary, resume commands and rules, sweep labels, no-op warnings, help."""
from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import QUICKSTART, run_cli


def hparams_of(run_dir) -> list[str]:
    """The HParams tab's keys of one run, in the order its event file holds them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    return [h.name for h in plugin_data_pb2.HParamsPluginData.FromString(content).experiment.hparam_infos]


def test_a_run_prints_its_directory_first_progress_every_n_steps_and_a_summary_last(tmp_path):
    proc = run_cli("run", str(QUICKSTART), f"log.dir={tmp_path}", "train.max_epochs=2", "log.every=5")
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "quickstart" / "version_0"
    lines = proc.stdout.splitlines()
    assert lines[0] == f"run: {run_dir}  (watch: tensorboard --logdir {run_dir})"
    progress = [line for line in lines if line.startswith("step ")]
    # 13 steps an epoch: a line at 5, 10, ..., 25, and one for the last step
    assert [int(line.split()[1].split("/")[0]) for line in progress] == [5, 10, 15, 20, 25, 26]
    assert progress[0].startswith("step 5/26  epoch 1/2  loss=") and "lr=0.01" in progress[0]
    assert "samples/s=" in progress[0] and progress[-1].startswith("step 26/26  epoch 2/2")
    assert lines[-3] == f"done: {run_dir}"
    assert lines[-2].startswith("  stopped: max_epochs=2 at step 26, 2 full epochs, after ")
    assert lines[-1].startswith("  final: train/loss=") and "val/loss=" in lines[-1]


def test_summary_names_early_stopping_and_the_best_checkpoint(tmp_path):
    proc = run_cli("run", str(QUICKSTART), f"log.dir={tmp_path}", "train.max_epochs=50", "train.monitor=val/loss",
                   "train.patience=1", "train.min_delta=1000")
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "quickstart" / "version_0"
    assert "  stopped: early stopping (val/loss did not improve for 1 check) at step 26, 2 full epochs" in proc.stdout
    best = run_dir / "checkpoints" / "best.pt"
    assert f"  best: val/loss=" in proc.stdout and proc.stdout.rstrip().endswith(f"checkpoint {best}")


@pytest.mark.slow
def test_an_interrupted_runs_message_holds_a_resume_command_that_resumes(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "run", str(QUICKSTART), f"log.dir={tmp_path}",
                             "data.n_samples=50000", "data.batch_size=1", "data.val_fraction=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "quickstart" / "version_0"
    while not (run_dir / "config.yaml").exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert out.startswith(f"run: {run_dir}") and "done:" not in out
    command = err.split("to resume: ")[1].split("]")[0]
    assert command == f"trainer run --resume {run_dir}" and f"run directory {run_dir}" in err
    # the command as printed, plus a limit so that the 50,000-step epoch ends soon
    step = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]
    resumed = run_cli(*shlex.split(command)[1:], f"train.max_steps={step + 3}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {step} (epoch 0)" in resumed.stdout
    assert f"  stopped: max_steps={step + 3} at step {step + 3}" in resumed.stdout


def test_resume_without_a_config_says_the_step_finished_runs_do_nothing_and_overrides_are_recorded(tmp_path):
    first = run_cli("run", str(QUICKSTART), f"log.dir={tmp_path}", "train.max_epochs=1")
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "quickstart" / "version_0"
    # every file but .lock, which any process that opens the run takes (and stamps) while it holds it
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name != ".lock"}
    again = run_cli("run", "--resume", str(run_dir))
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"run {run_dir} already finished at step 13 (max_epochs=1); nothing to do")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.name != ".lock"} == before  # nothing written
    more = run_cli("run", "--resume", str(run_dir), "train.max_epochs=2")
    assert more.returncode == 0, more.stderr
    assert more.stdout.splitlines()[:2] == [f"run: {run_dir}  (watch: tensorboard --logdir {run_dir})",
                                            "resuming from step 13 (epoch 1)"]
    assert "  stopped: max_epochs=2 at step 26, 2 full epochs" in more.stdout
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_epochs"] == 2
    [record] = yaml.safe_load((run_dir / "resumes.yaml").read_text())
    assert record["step"] == 13 and record["overrides"] == {"train.max_epochs": 2} and "time" in record


def test_resume_with_a_different_config_or_model_is_one_error_line(tmp_path):
    assert run_cli("run", str(QUICKSTART), f"log.dir={tmp_path}", "train.max_steps=2").returncode == 0
    run_dir = tmp_path / "quickstart" / "version_0"
    other = tmp_path / "other.yaml"
    other.write_text(QUICKSTART.read_text().replace("lr: 0.01", "lr: 0.5"))
    proc = run_cli("run", str(other), f"log.dir={tmp_path}", "train.max_steps=2", "--resume", str(run_dir))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "differs from the run's config.yaml in optimizer.lr" in proc.stderr
    proc = run_cli("run", "--resume", str(run_dir), "model.in_features=5", "data.in_features=5", "train.max_steps=4")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "parameter weight is [1, 10] in the checkpoint, [1, 5] in this model" in proc.stderr


@pytest.mark.slow
def test_a_sweeps_lines_show_their_values_and_its_hparams_lead_with_the_swept_keys(tmp_path):
    proc = run_cli("run", str(QUICKSTART), f"log.dir={tmp_path}", "train.max_steps=3",
                   "--sweep", "optimizer.lr=0.1,0.01", "optimizer.name=sgd,adam")
    assert proc.returncode == 0, proc.stderr
    starts = [line for line in proc.stdout.splitlines() if line.startswith("run: ")]
    assert [line.split("  ")[1] for line in starts] == [
        "optimizer.lr=0.1 optimizer.name=sgd", "optimizer.lr=0.1 optimizer.name=adam",
        "optimizer.lr=0.01 optimizer.name=sgd", "optimizer.lr=0.01 optimizer.name=adam"]
    assert sum(line.startswith("done: ") for line in proc.stdout.splitlines()) == 4
    for i in range(4):
        keys = hparams_of(tmp_path / "quickstart" / f"version_{i}")
        assert keys[:2] == ["optimizer.lr", "optimizer.name"]
        assert "train.max_steps" in keys and "compare.atol" not in keys  # set keys in, untouched defaults out


def test_a_layers_entry_that_swaps_nothing_warns(tmp_path):
    proc = run_cli("run", str(QUICKSTART), f"log.dir={tmp_path}", "train.max_steps=2", "layers.relu=custom")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "warning: layers.relu: linear and mse have no relu layer, so this entry swaps nothing"]


def test_config_lists_the_swapped_layers_and_stays_yaml():
    proc = run_cli("config", str(QUICKSTART), "model={name: mlp, in_features: 10, out_features: 1, hidden: [4]}",
                   "layers.relu=custom")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "# layers swapped to custom: 1 -> CustomReLU"
    assert yaml.safe_load(proc.stdout)["layers"] == {"default": "native", "relu": "custom"}


@pytest.mark.parametrize("command,arguments", [
    ("run", ["config", "overrides", "--resume", "--sweep"]),
    ("compare", ["config", "overrides", "--json", "--steps"]),
    ("config", ["config", "overrides"]),
    ("layers", ["--imports"]),
    ("gradcheck", ["LAYER", "--imports", "--device"]),
])
def test_every_subcommand_help_describes_each_argument(command, arguments):
    proc = run_cli(command, "--help")
    assert proc.returncode == 0, proc.stderr
    body = proc.stdout.split("\n\n", 1)[1]  # past the usage line
    for arg in arguments:
        line = next(line for line in body.splitlines() if line.strip().startswith(arg))
        described = line.strip()[len(arg):].strip().split(maxsplit=1)
        following = body.split(line, 1)[1].splitlines()[:1]
        assert described or following and following[0].startswith(" " * 10), f"{command} {arg} has no description"


def test_top_level_examples_are_one_per_line():
    proc = run_cli("--help")
    examples = proc.stdout.split("examples:\n", 1)[1].split("\n\n")[0].splitlines()
    assert all(line.startswith("  trainer ") and len(line) <= 100 for line in examples) and len(examples) >= 5


def test_a_count_below_one_suggests_null_only_where_null_is_accepted(tmp_path):
    proc = run_cli("run", str(QUICKSTART), f"log.dir={tmp_path}", "data.batch_size=0")
    assert proc.returncode == 2 and "null" not in proc.stderr and "use 1 or more" in proc.stderr
    proc = run_cli("run", str(QUICKSTART), f"log.dir={tmp_path}", "data.batch_size=null")
    assert proc.returncode == 2  # refused, so never suggested
    proc = run_cli("run", str(QUICKSTART), f"log.dir={tmp_path}", "train.max_steps=0")
    assert proc.returncode == 2 and "or null to turn it off" in proc.stderr
    assert not (tmp_path / "quickstart").exists()


def test_each_shipped_config_writes_to_a_run_directory_named_like_it():
    for path in (QUICKSTART.parent).glob("*.yaml"):
        assert yaml.safe_load(path.read_text())["name"] == path.stem, path


def test_a_sweep_warns_about_a_no_op_layers_entry_once(tmp_path):
    proc = run_cli("run", str(QUICKSTART), f"log.dir={tmp_path}", "train.max_steps=1", "layers.relu=custom",
                   "--sweep", "optimizer.lr=0.1,0.01")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: layers.relu:") == 1
