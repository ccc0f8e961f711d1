"""Atomic writes leave outputs others can read (the mode a new file gets under the umask);
a damaged input or an unwritable output is one line naming the file and what to do."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from dlilabs.ground.errors import UserError
from dlilabs.ground.io import (
    DamagedFile,
    UnwritableFile,
    atomic_path,
    current_umask,
    once_per_file_state,
    read_json,
    read_npz,
    sha256_file,
    write_json,
)
from mounts import tmpfs


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


# --- One error path for files: damaged inputs and unwritable outputs are one line each ---


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


GOOD = npz_bytes(x=np.zeros((4, 28, 28), np.uint8), y=np.arange(4))
DAMAGED = {
    "truncated": (GOOD[: len(GOOD) // 2], "File is not a zip file"),
    "not an npz": (b"x,y\n1,2\n", "pickled"),
    "empty": (b"", "No data left in file"),
    "arrays missing": (npz_bytes(images=np.zeros(3)), "no array x, y"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_a_damaged_prepared_split_is_one_line_with_the_way_back(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # paths show as the user types them, relative to the project
    split = tmp_path / "data" / "prepared" / "mnist" / "train.npz"
    split.parent.mkdir(parents=True)
    content, reason = DAMAGED[case]
    split.write_bytes(content)
    with pytest.raises(DamagedFile) as caught:
        read_npz(split, ("x", "y"), "preprocess@mnist")
    message = str(caught.value)
    assert "\n" not in message and reason in message, message
    assert message.startswith("data/prepared/mnist/train.npz is damaged: not a readable .npz")
    assert message.endswith(
        "restore it with `dvc checkout data/prepared/mnist/train.npz` "
        "or rebuild it with `dvc repro preprocess@mnist`"
    )


def test_missing_and_damaged_json_name_the_stage(tmp_path):
    run_file = tmp_path / "run.json"
    with pytest.raises(UserError, match=r"run.json does not exist: run `dvc repro train@a` first"):
        read_json(run_file, "train@a", cached=False)
    for content, reason in (('{"run_id": "ab', "Unterminated string"), ("[1]", "a JSON list")):
        run_file.write_text(content)
        with pytest.raises(DamagedFile) as caught:
            read_json(run_file, "train@a", cached=False)
        assert reason in str(caught.value)
        # Not in DVC's cache (cache: false): only the stage can rebuild it.
        assert str(caught.value).endswith("; rebuild it with `dvc repro train@a`")
    run_file.write_text('{"run_id": "ab"}')
    assert read_json(run_file, "train@a") == {"run_id": "ab"}


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tmp_path):
    with tmpfs(tmp_path / "disk", size="64k") as disk:
        target = disk / "models" / "model.bin"
        with pytest.raises(UnwritableFile) as caught, atomic_path(target) as temporary:
            temporary.write_bytes(b"w" * 200_000)  # three times the disk
        message = str(caught.value)
        assert message.startswith(f"cannot write {target}: No space left on device")
        assert "the disk is full" in message and "\n" not in message
        assert list((disk / "models").iterdir()) == []  # no temporary file left
        write_json(disk / "metrics.json", {"small": 1})  # the disk works for what fits
        assert read_json(disk / "metrics.json") == {"small": 1}


def test_a_read_only_folder_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", read_only=True) as folder:
        with pytest.raises(UnwritableFile) as caught:
            write_json(folder / "eval" / "metrics.json", {"val/accuracy": 0.9})
        message = str(caught.value)
        assert f"cannot write {folder}/eval/metrics.json: Read-only file system" in message
        assert "read-only file system" in message and list(folder.iterdir()) == []


def test_a_file_is_hashed_once_per_state_and_again_once_it_changes(tmp_path):
    hashed = []

    def digest(path):
        hashed.append(Path(path).name)
        return sha256_file(path)

    remembered = once_per_file_state(digest)
    split = tmp_path / "train.npz"
    split.write_bytes(b"a" * 100)
    first = remembered(split)
    assert remembered(split) == first and remembered(str(split)) == first
    assert hashed == ["train.npz"]  # a sweep's jobs: the same file, hashed once

    split.write_bytes(b"b" * 100)  # written again in place: same size, new content
    state = split.stat()
    os.utime(split, ns=(state.st_atime_ns, state.st_mtime_ns + 1_000_000))
    assert remembered(split) == sha256_file(split) != first
    replaced = tmp_path / "new.npz"
    replaced.write_bytes(b"c" * 100)
    replaced.replace(split)  # written to a sibling, then renamed (how the stages write)
    assert remembered(split) == sha256_file(split)
    assert hashed == ["train.npz"] * 3
