"""A real small or read-only file system for tests of full disks and read-only folders.

`tmpfs(folder)` mounts a tmpfs there (mounting needs root, or CAP_SYS_ADMIN in a container);
where mounting is not permitted the test is skipped, saying why. Root ignores file modes, so
a chmod'ed folder would not do: only a read-only mount refuses root's writes.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "2m", read_only: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of `size` (mount's units: 2m, 512k) at `folder` (created), read-only if
    asked, for the block; unmounted after (lazily, should a process still hold a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except OSError as error:  # no mount command
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def fill(folder: Path, leave_bytes: int) -> None:
    """Fill the file system of `folder` with one file until about `leave_bytes` are free."""
    import os

    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    with open(folder / "filler", "wb") as filler:
        filler.write(b"\0" * max(free - leave_bytes, 0))
