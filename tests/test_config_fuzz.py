"""Property: whatever YAML or overrides a user feeds the loader, the only error is ConfigError."""
from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import QUICKSTART
from trainer import ConfigError, load_config

KEYS = ["name", "seed", "imports", "model", "layers", "loss", "optimizer", "scheduler", "data", "train", "log",
        "compare", "lr", "in_features", "hidden", "max_steps", "max_epochs", "default", "relu", "batch_size",
        "every", "precision", "device", "activation", "monitor", "patience", "weight", "betas"]
NAMES = ["mlp", "linear", "cnn", "sgd", "adam", "mse", "cross_entropy", "regression", "cosine", "plateau",
         "native", "custom", "bf16", "auto"]

keys = st.sampled_from(KEYS) | st.text(max_size=6)
scalars = (st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats() | st.sampled_from(NAMES)
           | st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
                      max_leaves=25)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def harmless(doc):
    """Module names under `imports:` that cannot exist (a fuzzer must not import `antigravity`)."""
    if isinstance(doc, dict) and isinstance(doc.get("imports"), list):
        doc["imports"] = [f"zz_fuzz_{m}" if isinstance(m, str) else m for m in doc["imports"]]
    return doc


def loads_or_config_error(source, overrides=()):
    try:
        load_config(source, overrides)
    except ConfigError as e:
        assert str(e)  # always a message


@pytest.mark.slow
@FUZZ
@given(st.dictionaries(keys, values, max_size=8))
def test_random_documents(doc):
    loads_or_config_error(harmless(doc))


@pytest.mark.slow
@FUZZ
@given(st.dictionaries(st.sampled_from(["model", "loss", "optimizer", "data", "train", "log", "layers", "compare",
                                        "scheduler"]), values, max_size=4))
def test_random_sections_on_a_valid_config(sections):
    base = yaml.safe_load(QUICKSTART.read_text())
    loads_or_config_error(harmless({**base, **sections}))


def dotted(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += dotted(v, f"{prefix}{k}.")
    return out


REAL_PATHS = [p for p in dotted(load_config(QUICKSTART, ["scheduler={name: cosine}"]).to_dict()) if p != "imports"]


@pytest.mark.slow
@FUZZ
@given(st.lists(st.tuples(st.sampled_from(REAL_PATHS), values), min_size=1, max_size=3))
def test_random_values_at_every_real_key(pairs):
    """Every key of a resolved config, set to random YAML values: the type and range checks."""
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"
                 for k, v in pairs]
    loads_or_config_error(QUICKSTART, overrides)


paths = st.sampled_from(["optimizer.lr", "model.hidden", "train.max_steps", "data.batch_size", "layers.default",
                         "model", "train", "log.every", "model.name", "scheduler", "compare.rtol", "seed",
                         "train.monitor", "x.y.z", ""]) | st.text(max_size=10)


@pytest.mark.slow
@FUZZ
@given(st.lists(st.tuples(paths, st.text(max_size=12) | st.sampled_from(NAMES + ["[1, 2]", "{a: 1}", "null"])),
                max_size=3))
def test_random_overrides(pairs):
    overrides = [f"{k}={v}" for k, v in pairs if not k.startswith("imports")]
    loads_or_config_error(QUICKSTART, overrides)


@pytest.mark.slow
@FUZZ
@given(st.text(max_size=200))
def test_random_yaml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text)
    loads_or_config_error(path)


# YAML text with anchors, aliases (possibly undefined, recursive or exponential) and nesting of any depth
anchor_names = st.sampled_from(["a", "b", "c"])
leaf_text = st.sampled_from(["1", "x", "null", "*a", "*b", "*c", "[]", "{}", "1e999", ".inf", "-0.5", "'s'"])
node_text = st.recursive(
    leaf_text,
    lambda inner: (st.lists(inner, max_size=9).map(lambda xs: "[" + ", ".join(xs) + "]")
                   | st.lists(st.tuples(st.sampled_from(KEYS), inner), max_size=5).map(
                       lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}")
                   | st.tuples(anchor_names, inner).map(lambda t: f"&{t[0]} {t[1]}")),
    max_leaves=60)


def nest(depth: int, opener: str, closer: str, inside: str) -> str:
    return opener * depth + inside + closer * depth


deep_text = st.tuples(st.integers(1, 3000), st.sampled_from([("[", "]"), ("{k: ", "}")]), node_text).map(
    lambda t: nest(t[0], t[1][0], t[1][1], t[2]))
bomb_text = st.tuples(st.integers(1, 12), st.integers(1, 12)).map(
    lambda t: "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'lol'] * t[1])}]\n" for i in range(t[0])))


YAML_FUZZ = settings(FUZZ, max_examples=150)  # each example writes and parses a file of up to ~10 kB


@pytest.mark.slow
@YAML_FUZZ
@given(st.lists(st.tuples(st.sampled_from(["model", "optimizer", "data", "train", "extra", "log"]),
                          node_text | deep_text), max_size=4), st.none() | bomb_text)
def test_aliases_deep_nesting_and_bombs_are_config_errors(tmp_path_factory, sections, bomb):
    """Whatever anchors, aliases and depth a file holds, reading it costs a bounded time and raises ConfigError."""
    text = (bomb or "") + "".join(f"{k}: {v}\n" for k, v in sections) + QUICKSTART.read_text()
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(text)
    loads_or_config_error(path)


@pytest.mark.slow
@YAML_FUZZ
@given(st.sampled_from(["model.hidden", "optimizer.betas", "model", "train", "extra.key"]), node_text | deep_text)
def test_aliases_and_deep_nesting_in_overrides_are_config_errors(path, value):
    loads_or_config_error(QUICKSTART, [f"{path}={value}"])
