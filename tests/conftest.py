"""Shared fixtures: the original Darknet cfgs and small models with random weights."""

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
_SHARED = REPO.parent / "shared" / "darknet" / "cfg"
CFG_DIR = _SHARED if _SHARED.is_dir() else REPO / "kprune" / "models" / "cfg"


def cfg_path(name: str) -> str:
    return str(CFG_DIR / f"{name}.cfg")


def randomize(model, seed: int = 0, scale: float = 0.1) -> None:
    """Give every weight random values (variances positive, some of them tiny)."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        values = rng.normal(0.0, scale, weight.shape).astype(np.float32)
        if "moving_variance" in weight.name:
            values = np.abs(values) + 1e-4
        weight.assign(values)


@pytest.fixture(scope="session")
def cfg_dir() -> Path:
    return CFG_DIR


@pytest.fixture(scope="session")
def tiny_synth_data(tmp_path_factory) -> str:
    """16 training and 8 validation synthetic images of 64 px, converted: a dataset to train on."""
    from data_tools import coco, synth
    from data_tools.convert import write_dataset

    root = tmp_path_factory.mktemp("tiny-synth")
    synth.generate(root / "raw", num_train=16, num_val=8, size=64, seed=1, progress=False)
    records, names, _ = coco.coco_records(root / "raw", 2017, None)
    write_dataset(records, names, root / "data", {"kind": "coco"}, {}, progress=False)
    return str(root / "data")


def pytest_collection_modifyitems(config, items):
    """The slow tests first (otherwise in file order): with two workers, a long test started last
    would leave one worker idle while it runs."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
