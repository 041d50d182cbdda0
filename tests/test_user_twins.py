"""User twins are first-class: replacing a built-in's twin, clashes as one error line, gradcheck on derived
inputs, and `trainer layers` showing measured facts. Real `trainer` subprocesses on user modules in tmp dirs."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from conftest import run_cli
from trainer import layers
from trainer.errors import ConfigError
from trainer.check.probe import check_cases, derive_case
from trainer.layers import RegistrationError

MY_SILU = textwrap.dedent("""
    import torch
    from torch import nn
    from trainer import layers


    class SiLUFunction(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * torch.sigmoid(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, grad_output):
            (x,) = ctx.saved_tensors
            s = torch.sigmoid(x)
            # d/dx x sigmoid(x) = s (1 + x (1 - s))
            return grad_output * s * (1 + x * (1 - s))


    class MySiLU(nn.SiLU):
        function = SiLUFunction

        def forward(self, x):
            return SiLUFunction.apply(x)


    layers.register("silu", native=nn.SiLU, custom=MySiLU, replace=True)
""")
WRONG = "return grad_output * s * (1 + x * (1 - s))"  # replaced by a planted bug: the term x (1 - s) dropped
CONFIG = textwrap.dedent("""
    name: user_silu
    seed: 0
    imports: [{module}]
    model:     {{name: mlp, in_features: 10, hidden: [16], out_features: 1, activation: silu}}
    layers:    {{default: native, silu: custom}}
    loss:      {{name: mse}}
    optimizer: {{name: sgd, lr: 0.01}}
    data:      {{name: regression, batch_size: 64}}
    train:     {{max_steps: 2}}
    log:       {{dir: runs}}
""")


def user_module(tmp_path, name: str, text: str) -> str:
    (tmp_path / f"{name}.py").write_text(text)
    return name


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def assert_one_error_line(proc: subprocess.CompletedProcess, start: str) -> str:
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: {start}") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


@pytest.mark.slow
def test_a_user_twin_replaces_the_builtin_one_and_compare_runs_it(tmp_path):
    user_module(tmp_path, "my_silu", MY_SILU)
    (tmp_path / "ok.yaml").write_text(CONFIG.format(module="my_silu"))
    ok = run_cli("compare", "ok.yaml", cwd=tmp_path)
    assert ok.returncode == 0 and "ok: 8 of 8 tensors" in ok.stdout, ok.stdout + ok.stderr
    # the same with a planted bug: compare must see the user's twin, not the built-in one
    user_module(tmp_path, "bad_silu", MY_SILU.replace(WRONG, "return grad_output * s"))
    (tmp_path / "bad.yaml").write_text(CONFIG.format(module="bad_silu"))
    bad = run_cli("compare", "bad.yaml", cwd=tmp_path)
    assert bad.returncode == 1 and "MISMATCH" in bad.stdout and "silu" in bad.stdout, bad.stdout + bad.stderr


def test_a_clash_is_one_error_line_naming_the_users_call_and_the_fix(tmp_path):
    text = MY_SILU.replace(", replace=True", "")
    user_module(tmp_path, "clash", text)
    where = f"clash.py:{line_of(text, 'layers.register(')}"
    err = assert_one_error_line(run_cli("layers", "--imports", "clash", cwd=tmp_path), f"imports[0]: {where}: ")
    assert "layer 'silu': the name is taken by the built-in twin CustomSiLU" in err
    assert "layers.register('silu', native=SiLU, custom=MySiLU, replace=True)" in err
    (tmp_path / "clash.yaml").write_text(CONFIG.format(module="clash"))
    assert_one_error_line(run_cli("compare", "clash.yaml", cwd=tmp_path), f"imports[0]: {where}: ")
    assert not (tmp_path / "runs").exists()


def test_another_name_for_a_taken_native_class_says_to_replace_under_its_name(tmp_path):
    text = MY_SILU.replace('register("silu"', 'register("my_silu"').replace(", replace=True", "")
    user_module(tmp_path, "other", text)
    err = assert_one_error_line(run_cli("layers", "--imports", "other", cwd=tmp_path), "imports[0]: other.py:")
    assert "layer 'my_silu': SiLU already has a twin: layer 'silu', the built-in twin CustomSiLU" in err
    assert "register it under that name with replace=True: layers.register('silu'" in err


def test_import_order_never_blames_a_builtin(tmp_path):
    """A user module imported first in a fresh process: the built-ins are registered before its call, always."""
    user_module(tmp_path, "early_ok", MY_SILU)
    user_module(tmp_path, "early_clash", MY_SILU.replace(", replace=True", ""))
    script = "import sys, {m}; from trainer import layers; print(layers.get('silu').custom.__module__)"
    ok = subprocess.run([sys.executable, "-c", script.format(m="early_ok")], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == "early_ok", ok.stderr
    bad = subprocess.run([sys.executable, "-c", script.format(m="early_clash")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert "RegistrationError: early_clash.py:" in bad.stderr and "trainer/" not in bad.stderr.splitlines()[-1]


def test_register_accepts_a_list_of_cases_and_replace_swaps_to_the_new_twin():
    class Cube(nn.Module):
        def forward(self, x):
            return x ** 3

    class CustomCube(Cube):
        def forward(self, x):
            return x * x * x

    class OtherCube(Cube):
        def forward(self, x):
            return x * x * x

    case = layers.Case("cube", Cube, lambda g: (torch.randn(5, generator=g, dtype=torch.float64),))
    spec = layers.register("user_cube_a", native=Cube, custom=CustomCube, cases=[case])
    assert spec.cases() == [case] and not spec.builtin and spec.vmap is None
    with pytest.raises(RegistrationError, match="replace=True") as e:
        layers.register("user_cube_a", native=Cube, custom=OtherCube)
    assert isinstance(e.value, ValueError) and "test_user_twins.py:" in e.value.path
    layers.register("user_cube_a", native=Cube, custom=OtherCube, replace=True)
    assert type(layers.swap(Cube(), {"user_cube_a": "custom"})) is OtherCube


@pytest.mark.parametrize("native, shape", [
    (nn.SiLU, (3, 5)), (nn.Linear, (3, 4)), (nn.Conv2d, (1, 2, 5, 5)), (nn.BatchNorm2d, (2, 4, 4, 4)),
    (nn.LayerNorm, (3, 4)), (nn.MSELoss, (3, 5)), (nn.CrossEntropyLoss, (3, 5)),
])
def test_cases_are_derived_from_the_native_class(native, shape):
    spec = layers.LayerSpec(name="probe", pairs=((native, type("Twin", (native,), {})),))
    case = derive_case(spec)
    inputs = case.inputs(torch.Generator().manual_seed(0))
    assert tuple(inputs[0].shape) == shape
    assert isinstance(case.module(), native)


def test_what_cannot_be_derived_says_which_cases_to_add():
    class Scale(nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

    spec = layers.LayerSpec(name="scale", pairs=((Scale, type("S", (Scale,), {})),))
    with pytest.raises(ConfigError, match=r"Scale\(\) needs factor.*cases=\[Case\('scale'"):
        check_cases(spec)
    edge = layers.Case("e", nn.ReLU, lambda g: (torch.zeros(3),), gradcheck=False)
    only_edges = layers.LayerSpec(name="e", pairs=((nn.ReLU, nn.ReLU),), cases=lambda: [edge])
    with pytest.raises(ConfigError, match="only edge-value cases"):
        check_cases(only_edges)


MORE = textwrap.dedent("""
    import torch
    from torch import nn
    from trainer import layers


    class Scale(nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor


    class ScaleFunction(torch.autograd.Function):
        @staticmethod
        def forward(x, factor):
            return x * factor

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.factor = inputs[1]

        @staticmethod
        def backward(ctx, g):
            return g * ctx.factor, None


    class MyScale(Scale):
        def forward(self, x):
            return ScaleFunction.apply(x, self.factor)


    class LinearFunction(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x, w, b):
            return x @ w.T + b

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0], inputs[1])

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            # y = x W^T + b: dx = g W, dW = g^T x, db = g summed over rows
            return g @ w, g.T @ x, g.sum(0)


    class MyLinear(nn.Linear):
        def forward(self, x):
            return LinearFunction.apply(x, self.weight, self.bias)


    class Twice(nn.Module):
        def forward(self, x):
            return 2 * x


    class BrokenTwice(Twice):
        def forward(self, x):
            raise RuntimeError("not written yet")


    layers.register("scale", native=Scale, custom=MyScale)
    layers.register("linear", native=nn.Linear, custom=MyLinear, replace=True)
    layers.register("twice", native=Twice, custom=BrokenTwice)
""")


@pytest.mark.slow
def test_gradcheck_checks_a_user_twin_without_cases_on_derived_inputs(tmp_path):
    user_module(tmp_path, "my_silu", MY_SILU)
    ok = run_cli("gradcheck", "silu", "--imports", "my_silu", cwd=tmp_path)
    assert ok.returncode == 0 and "silu-derived" in ok.stdout and "3 passed, 0 failed" in ok.stdout, ok.stdout
    user_module(tmp_path, "bad_silu", MY_SILU.replace(WRONG, "return grad_output * s"))
    bad = run_cli("gradcheck", "silu", "--imports", "bad_silu", cwd=tmp_path)
    assert bad.returncode == 1 and "FAIL" in bad.stdout and "Jacobian mismatch" in bad.stdout, bad.stdout


def test_gradcheck_says_what_to_add_where_no_case_can_be_derived(tmp_path):
    user_module(tmp_path, "more", MORE)
    err = assert_one_error_line(run_cli("gradcheck", "scale", "--imports", "more", cwd=tmp_path), "LAYER: ")
    assert "layer 'scale' has no cases" in err and "Scale() needs factor" in err and "cases=[Case('scale'" in err


@pytest.mark.slow
def test_layers_shows_measured_facts_for_user_twins_within_100_columns(tmp_path):
    user_module(tmp_path, "my_silu", MY_SILU)
    user_module(tmp_path, "more", MORE)
    proc = run_cli("layers", "--imports", "my_silu", "more", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    rows = {r[0]: r for r in (line.split() for line in lines[2:lines.index("")])}
    # columns: layer native B/elem 2nd-bwd vmap compile registered
    assert rows["silu"][3:7] == ["yes", "no", "yes", f"my_silu.py:{line_of(MY_SILU, 'layers.register(')}"]
    assert rows["linear"][3:6] == ["no", "yes", "yes"]          # once_differentiable; generate_vmap_rule
    scale_line = line_of(MORE, 'register("scale"')
    assert rows["scale"][2:7] == ["-", "unchecked", "unchecked", "unchecked", f"more.py:{scale_line}"]
    assert rows["relu"][3:7] == ["yes", "yes", "yes", "built-in"]  # declared, checked by tests/test_layers.py
    assert rows["twice"][2:6] == ["-", "no", "no", "no"]  # a twin that raises is listed, not a traceback
    wide = run_cli("layers", "--wide", "--imports", "my_silu", cwd=tmp_path)
    assert "MySiLU" in wide.stdout and "CustomReLU" in wide.stdout and "MySiLU" not in proc.stdout


def test_gradcheck_never_reports_nothing_as_a_pass(tmp_path):
    """A registry entry whose only case is an edge case (gradcheck=False), registered by a real module."""
    module = textwrap.dedent("""
        import torch
        from torch import nn
        from trainer import layers
        from trainer.layers import Case

        class Ident(nn.Module):
            def forward(self, x):
                return x

        class MyIdent(Ident):
            def forward(self, x):
                return x.clone()

        layers.register("ident", native=Ident, custom=MyIdent,
                        cases=[Case("ident-zeros", Ident, lambda g: (torch.zeros(3, dtype=torch.float64),),
                                    gradcheck=False)])
    """)
    user_module(tmp_path, "ident", module)
    err = assert_one_error_line(run_cli("gradcheck", "ident", "--imports", "ident", cwd=tmp_path), "LAYER: ")
    assert "only edge-value cases" in err
