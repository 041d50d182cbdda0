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
