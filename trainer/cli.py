"""The ``trainer`` command: run, compare, gradcheck, layers, config."""
from __future__ import annotations

import argparse
import itertools
import os
import signal
import sys
import threading
from collections.abc import Sequence

from trainer import __version__
from trainer.check.report import table
from trainer.errors import ConfigError

EXAMPLES = """examples:
  trainer run configs/quickstart.yaml optimizer.lr=0.1
  trainer run configs/classification.yaml --sweep optimizer.lr=0.1,0.01
  trainer run --resume runs/quickstart/version_0 train.max_epochs=20
  trainer config configs/quickstart.yaml layers.default=custom
  trainer compare configs/quickstart.yaml layers.default=custom
  trainer layers
  trainer gradcheck relu

reference: docs/cli.md"""
OVERRIDES = "dotted key=value overrides, applied after the file"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line and exit 2, like every other user error
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def split_values(text: str) -> list[str]:
    """``0.1,0.01`` -> two values; commas inside [] or {} stay (``[64,64],[32]``)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + [cur]


def sweep_overrides(sweep: Sequence[str]) -> list[list[str]]:
    """``["a=1,2", "b=x,y"]`` -> the cartesian product as override lists."""
    axes = []
    for item in sweep:
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "bad --sweep item", suggestion="write key=value1,value2, e.g. optimizer.lr=0.1,0.01")
        axes.append([f"{key}={v}" for v in split_values(values)])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def cmd_run(args: argparse.Namespace) -> int:
    if args.resume and args.sweep:
        raise ConfigError("--resume", "cannot be combined with --sweep", suggestion="resume one run at a time")
    if args.config is not None and "=" in args.config and not os.path.exists(args.config):
        args.config, args.overrides = None, [args.config, *args.overrides]  # `run --resume DIR key=value`
    if args.resume:
        return resume_run(args)
    if args.config is None:
        raise ConfigError("config", "no config file given",
                          suggestion="trainer run CONFIG.yaml [key=value ...], or trainer run --resume RUN_DIR")
    from trainer import Trainer  # with shadow mode and NaN diagnosis attached
    from trainer.build import build
    from trainer.config import load_config

    combos = sweep_overrides(args.sweep)
    configs = [load_config(args.config, [*args.overrides, *combo]) for combo in combos]
    if len(configs) > 1:
        for cfg in configs:  # build every combination once before any run writes anything
            build(cfg)
    for cfg, combo in zip(configs, combos):
        Trainer(cfg, report=True, label=" ".join(combo)).fit()
    return 0


def resume_run(args: argparse.Namespace) -> int:
    """``run --resume RUN_DIR``: the run's own config.yaml (a config given too must agree), plus overrides."""
    from pathlib import Path

    from trainer import Trainer
    from trainer.config import load_config
    from trainer.logs import flatten

    saved = Path(args.resume) / "config.yaml"
    if not saved.is_file() and args.config is None:
        raise ConfigError("--resume", f"{args.resume} holds no config.yaml, so it is not a run directory",
                          suggestion="pass a folder trainer run printed, runs/<name>/version_<N>")
    cfg = load_config(saved if saved.is_file() else args.config, args.overrides)
    if args.config is not None and saved.is_file():
        given = flatten(load_config(args.config, args.overrides).to_dict())
        ours = flatten(cfg.to_dict())
        differ = [k for k in {**ours, **given} if ours.get(k, "<unset>") != given.get(k, "<unset>")]
        if differ:
            raise ConfigError("config", f"{args.config} differs from the run's config.yaml in {', '.join(differ)}",
                              suggestion=f"leave the config out ({console_resume(args.resume)}) "
                                         "and change keys with key=value")
    Trainer(cfg, resume=args.resume, report=True).fit()
    return 0


def console_resume(run_dir) -> str:
    from trainer.console import resume_command

    return resume_command(run_dir)


def how_to_go_on(e: BaseException) -> str:
    """``; run directory D; to resume: trainer run --resume D`` for an error that stopped a run with a checkpoint."""
    from pathlib import Path

    run_dir = getattr(e, "run_dir", None)
    if run_dir is None or not any(Path(run_dir, "checkpoints").glob("*.pt")):
        return ""
    return f" [run directory {run_dir}; to resume: {console_resume(run_dir)}]"


def check_writable(path) -> None:
    """Raise ConfigError (``--json``) unless ``path`` can be written as a file: not a folder, in a writable folder."""
    if path.is_dir():
        raise ConfigError("--json", f"{path} is a folder, not a file",
                          suggestion=f"name a file, e.g. {path / 'compare.json'}")
    if not path.resolve().parent.is_dir():
        raise ConfigError("--json", f"no folder for {path}", suggestion="create the folder first")
    if not os.access(path if path.exists() else path.resolve().parent, os.W_OK):
        raise ConfigError("--json", f"cannot write {path} (no permission)", suggestion="name a file you can write")


def cmd_compare(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from trainer.check.compare import compare_config
    from trainer.check.report import format_report
    from trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.json:  # before any work or output: a report that cannot be written is known now
        check_writable(Path(args.json))
    if args.steps is not None:
        from trainer.check.lockstep import run_lockstep

        if args.steps < 1:
            raise ConfigError("--steps", f"must be at least 1, got {args.steps}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--steps", "the lockstep run is single-process", suggestion="run it without torchrun")
        result = run_lockstep(cfg, args.steps)
        print("\n".join(result.lines()))
        return 0 if result.ok else 1
    from trainer import distributed

    report, env = compare_config(cfg)
    ok = not distributed.any_rank(not report.ok, env)  # under torchrun: every rank's shard must agree
    if env.main:
        if report.error:  # a twin raised: one line, and the JSON marks that layer failed
            print(f"error: {report.error}", file=sys.stderr)
        else:
            print(format_report(report) + ("" if ok == report.ok else "\nMISMATCH on another rank's batches"))
        if args.json:
            Path(args.json).write_text(json.dumps(report.to_dict() | {"ok": ok}, indent=2))
    return 0 if ok else 1


def cmd_config(args: argparse.Namespace) -> int:
    from trainer.build import swapped_layers
    from trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    swapped = swapped_layers(cfg)  # builds the model and the loss only: no data, nothing written
    sys.stdout.write(cfg.to_yaml())
    # a YAML comment, so stdout stays a config that loads as it is
    sys.stdout.write("# layers swapped to custom: " + (", ".join(swapped) if swapped else "none") + "\n")
    return 0


def import_user_modules(args: argparse.Namespace) -> None:
    from trainer.config import import_modules

    import_modules(args.imports)


LAYERS_LEGEND = """\
B/elem: bytes autograd saves per input element in Linear -> layer -> Linear, custom / native.
2nd bwd, vmap, compile: a built-in's as declared (the test suite checks them); a user twin's
measured now on its first case, given or derived: yes; no (raises); wrong (runs, but disagrees
with gradgradcheck, native's jacrev or eager); unchecked (no case: add cases= to layers.register)."""


def cmd_layers(args: argparse.Namespace) -> int:
    from trainer import layers
    from trainer.check.probe import facts, saved_per_element

    import_user_modules(args)
    rows = []
    for spec in layers.specs():
        per_elem = saved_per_element(spec)
        natives = ",".join(n.__name__ for n, _ in spec.pairs)
        customs = ",".join(c.__name__ for _, c in spec.pairs)
        found = facts(spec)
        flags = [found[flag] for flag in ("double_backward", "vmap", "compile")]
        origin = "built-in" if spec.builtin else spec.origin
        wide = [customs, spec.saves or "-"] if args.wide else []
        rows.append([spec.name, natives, per_elem, *flags, origin, *wide])
    headers = ["layer", "native", "B/elem", "2nd bwd", "vmap", "compile", "registered"]
    print(table(rows, headers + (["custom", "custom saves"] if args.wide else [])))
    print("\n" + LAYERS_LEGEND)
    return 0


def cmd_gradcheck(args: argparse.Namespace) -> int:
    import torch

    from trainer import layers
    from trainer.check.probe import gradcheck_layers

    import_user_modules(args)
    for name in args.layers:
        layers.get(name, "LAYER")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda asked for, but this machine has no CUDA device",
                          suggestion="leave --device out to check on the CPU")
    results = gradcheck_layers(args.layers or None, args.device)
    if not results:  # never "0 passed, 0 failed" and exit 0
        raise ConfigError("LAYER", "nothing to check", suggestion="name a registered layer; see trainer layers")
    rows = [[r.layer, r.case, r.check, "ok" if r.ok else "FAIL", f"{r.seconds * 1000:.0f} ms", r.message]
            for r in results]
    print(table(rows, ["layer", "case", "check", "result", "time", "detail"]))
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (for help) and each command's parser."""
    p = Parser(prog="trainer", description="Config-driven PyTorch training with hand-written autograd twins.",
               epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = sub.add_parser("run", help="train; writes <log.dir>/<name>/version_<N>/")
    run.add_argument("config", nargs="?", help="a YAML config file (optional with --resume: the run's config.yaml)")
    run.add_argument("overrides", nargs="*", help=OVERRIDES + ", e.g. optimizer.lr=0.1 train.max_epochs=3; "
                     "with --resume, recorded in the run directory (config.yaml, resumes.yaml)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue that run from its last checkpoint, in place; a finished run trains on only "
                          "if an override raises train.max_epochs or train.max_steps")
    run.add_argument("--sweep", nargs="+", default=[], metavar="KEY=V1,V2",
                     help="one run per combination of the listed values (cartesian product)")
    run.set_defaults(fn=cmd_run)
    cmp = sub.add_parser("compare", help="native vs custom gradients on the config's model and data")
    cmp.add_argument("config", help="a YAML config file: its model, loss and data are compared")
    cmp.add_argument("overrides", nargs="*", help=OVERRIDES + ", e.g. layers.default=custom")
    cmp.add_argument("--json", metavar="PATH", help="also write the comparison as JSON")
    cmp.add_argument("--steps", type=int, metavar="N",
                     help="lockstep: train native and custom side by side for N steps, logging their divergence")
    cmp.set_defaults(fn=cmd_compare)
    cfg = sub.add_parser("config", help="print the fully resolved config as YAML, and which layers it swaps")
    cfg.add_argument("config", help="a YAML config file")
    cfg.add_argument("overrides", nargs="*", help=OVERRIDES + ", e.g. layers.default=custom")
    cfg.set_defaults(fn=cmd_config)
    lay = sub.add_parser("layers", help="the layer registry as a table")
    lay.add_argument("--imports", nargs="+", default=[], metavar="MODULE", help="modules that register layers")
    lay.add_argument("--wide", action="store_true", help="also the twin classes and what they save (over 100 columns)")
    lay.set_defaults(fn=cmd_layers)
    gc = sub.add_parser("gradcheck", help="gradcheck/gradgradcheck (float64) of the custom twins")
    gc.add_argument("layers", nargs="*", metavar="LAYER", help="layer names (default: all)")
    gc.add_argument("--imports", nargs="+", default=[], metavar="MODULE", help="modules that register layers")
    gc.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the checks run (cuda checks the twins' formulas on CUDA kernels)")
    gc.set_defaults(fn=cmd_gradcheck)
    return p, sub.choices


class Stopped(KeyboardInterrupt):
    """A stop signal outside the training loop: while loading, building, or between runs."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _stop(signum: int, frame) -> None:
    # Already stopping (a stop the loop raised, or a first Stopped, is unwinding through clean-up code):
    # that stop and its exit code stand; raising here would cut the clean-up short and replace it.
    if isinstance(sys.exc_info()[1], KeyboardInterrupt):
        return
    # Inside an import, an exception can be swallowed (a library's bare ``except:`` around an optional
    # import) or leave a C extension half-loaded ("cannot load module more than once"): the signal comes
    # back in 50 ms, until the import is over.
    if _importing(frame):
        threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, signum)).start()
        return
    raise Stopped(signum)


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # SIGUSR1: slurm's --signal=USR1@SECONDS


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch loads (seconds): a signal at any moment becomes an error line and 128 + its number.
    # The training loop installs its own handlers (finish the step, save) and restores these after.
    previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    try:
        return run_command(argv)
    except Stopped as e:
        ignore_signals()
        print(f"error: interrupted by {signal.Signals(e.signum).name} outside training (while loading, building "
              "or finishing); no checkpoint was written then", file=sys.stderr)
        return 128 + e.signum
    finally:
        # As the process's own command (argv None) an ending run keeps ignoring signals until the process exits,
        # so its exit code stands; called in-process, the caller's handlers come back.
        if argv is not None or signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
            for s, h in previous.items():
                signal.signal(s, h)


def ignore_signals() -> None:
    """The command is ending with its own exit code: a further signal must not turn that into a traceback."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def run_command(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top, commands = parser()
    if argv and argv[0] in commands:  # options and key=value overrides may come in any order
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
    else:
        args = top.parse_args(argv)
    if args.fn is cmd_run and args.config is None and not args.resume:  # before torch loads, like argparse's own
        commands["run"].error("the following arguments are required: config (or --resume RUN_DIR)")
    from trainer.check.shadow import ShadowMismatch
    from trainer.checkpoint import CheckpointError
    from trainer.loop import Interrupted, InterruptedTwice, NonFiniteLoss
    from trainer.targets import BadTargets

    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLoss, BadTargets, CheckpointError, ShadowMismatch) as e:
        ignore_signals()
        print(f"error: {e}{how_to_go_on(e)}", file=sys.stderr)
        return 1
    except Interrupted as e:
        ignore_signals()
        print(f"error: {e}{how_to_go_on(e)}", file=sys.stderr)
        return 128 + e.signum
    except InterruptedTwice as e:
        ignore_signals()
        print(f"error: interrupted twice ({signal.Signals(e.signum).name} after "
              f"{signal.Signals(e.first).name}); stopped without saving{how_to_go_on(e)}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:  # raised by user code, not by a signal the command handled
        if isinstance(e, Stopped):
            raise
        ignore_signals()
        print("error: interrupted; stopped without saving", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
