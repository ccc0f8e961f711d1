"""Atomic writes leave outputs others can read: the mode a new file gets under the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from dlilabs.ground.io import atomic_path, current_umask, write_json


@pytest.fixture
def umask():
    """Set the process umask for the test (`umask(0o022)`), restoring the old one after."""
    before = os.umask(0o022)
    os.umask(before)
    yield os.umask
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_outputs_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    with atomic_path(tmp_path / "out" / "model.bin") as temporary:
        temporary.write_bytes(b"weights")
    write_json(tmp_path / "out" / "metrics.json", {"val/accuracy": 0.9})
    for name in ("model.bin", "metrics.json"):
        assert mode(tmp_path / "out" / name) == expected, oct(mode(tmp_path / "out" / name))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "model.bin"]


def test_preprocess_outputs_are_readable_by_others(project, umask):
    """A real stage: the prepared splits and summary.json are 0644 under umask 022."""
    from dlilabs import preprocess
    from dlilabs.ground.config import compose

    umask(0o022)
    rng = np.random.default_rng(0)
    raw = project / "data" / "raw" / "mnist"
    raw.mkdir(parents=True)
    np.savez(
        raw / "mnist.npz",
        x_train=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        y_train=np.arange(20) % 10,
        x_test=rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        y_test=np.arange(10),
    )
    preprocess.run(compose(["dataset=mnist"]))
    prepared = project / "data" / "prepared" / "mnist"
    for name in ("train.npz", "val.npz", "summary.json", "samples.png"):
        assert mode(prepared / name) == 0o644, (name, oct(mode(prepared / name)))
