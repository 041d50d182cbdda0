"""Helper for test_repeatable.py, run as a fresh process: train every combination of the determinism matrix.

    python tests/repeat_runs.py OUT.json FIRST LOG_DIR

Runs the combinations in order starting at index FIRST (so a different one is this process's
first run), and writes {combination: sha256 of its final weights, "dataset/<...>": sha256 of its
training inputs} to OUT.json.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import sys

import torch

# workers x twins x dropout x accumulate
MATRIX = list(itertools.product([0, 2], ["native", "custom"], [0.0, 0.2], [1, 2]))


def name(workers: int, impl: str, dropout: float, accumulate: int) -> str:
    return f"workers={workers},layers={impl},dropout={dropout},accumulate={accumulate}"


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(workers: int, impl: str, dropout: float, accumulate: int, log_dir: str) -> tuple[str, str]:
    from trainer import Trainer, load_config

    doc = {"name": "repeat", "seed": 0,
           # the spirals' torch.cos on 3000 values is the kind of first parallel region the warm-up is for
           "data": {"name": "classification", "kind": "spirals", "n_samples": 3000, "batch_size": 64,
                    "num_workers": workers, "val_fraction": 0.05},
           "model": {"name": "mlp", "in_features": 2, "out_features": 3, "hidden": [16], "dropout": dropout},
           "layers": {"default": impl}, "loss": "cross_entropy", "optimizer": {"name": "adam", "lr": 0.01},
           "train": {"max_steps": 6, "max_epochs": None, "accumulate": accumulate},
           "log": {"dir": log_dir, "progress": False, "every": 3}}
    trainer = Trainer(load_config(doc))
    data = digest(trainer.train_loader.dataset.tensors)
    trainer.fit()
    return digest(trainer.model.state_dict().values()), data


def main() -> None:
    out, first, log_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    result = {}
    for combo in MATRIX[first:] + MATRIX[:first]:
        weights, data = run(*combo, log_dir)
        result[name(*combo)] = weights
        result[f"dataset/{name(*combo)}"] = data
    result["threads"] = torch.get_num_threads()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
