"""The DVC side of lineage: what identifies a prepared split on disk, with no MLflow.

A split (`<prepared_dir>/<split>.npz`) is identified by a digest of its arrays' contents
(`arrays_sha256`: dtype, shape and bytes, the same on every machine, unlike the .npz file,
whose zip entries carry the time they were written), its DVC md5 (`dvc_md5`, the cache key),
whether `dvc.lock` agrees (`locked_outputs`: locked, modified or unlocked) and the raw download
it came from (its dvc.lock md5 and provenance.json's `verified`). `split_record` gathers these
in a SplitRecord; dlilabs.tracking.lineage logs it as an MLflow dataset input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig

from dlilabs.ground.io import once_per_file_state

DIGEST_CHARS = 32  # MLflow keeps at most 36 characters of a dataset digest


def arrays_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of the arrays in an .npz file, by name: key, dtype, shape, then the C-order
    bytes of each. Machine-independent, unlike the file's own bytes."""
    digest = hashlib.sha256()
    with np.load(path, allow_pickle=False) as data:
        for key in sorted(data.files):
            array = np.ascontiguousarray(data[key])
            digest.update(f"{key}:{array.dtype.str}:{array.shape};".encode())
            digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def dvc_md5(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """A file's DVC 3 hash (`hash: md5` in dvc.lock): the md5 of its bytes, its cache key."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# What split_record computes for each of a sweep's jobs, once per file state in a process.
_split_sha256 = once_per_file_state(arrays_sha256)
_split_md5 = once_per_file_state(dvc_md5)


def locked_outputs(root: Path) -> dict[str, tuple[str, str]]:
    """{output path: (stage, md5)} from `root`/dvc.lock ({} without one). During `dvc repro`
    the lock holds every stage finished so far, so train sees preprocess's outputs."""
    lock = root / "dvc.lock"
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {
        str(out["path"]): (stage, str(out.get("md5", "")))
        for stage, entry in stages.items()
        for out in (entry or {}).get("outs") or []
        if isinstance(out, dict) and "path" in out
    }


def relative(path: Path, root: Path) -> str:
    """`path` relative to the project root when inside it (as DVC names it), else absolute."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


@dataclasses.dataclass
class SplitRecord:
    """What identifies one prepared split: where it is and what it holds."""

    path: str  # relative to the project root, as dvc.yaml names it
    sha256: str  # arrays_sha256
    md5: str  # dvc_md5: the DVC cache key
    dvc_lock: str  # "locked" (dvc.lock agrees), "modified" (it names another md5), "unlocked"
    stage: str | None  # the DVC stage that writes it
    raw: dict[str, Any]  # {"path", "md5" (or "unlocked"), "verified"} of the download

    @property
    def digest(self) -> str:
        return self.sha256[:DIGEST_CHARS]


def split_record(cfg: DictConfig, split: str) -> SplitRecord:
    """The SplitRecord of `split` ("train" or "val") of the configured dataset."""
    root = Path(cfg.paths.root)
    file = Path(cfg.paths.prepared_dir) / f"{split}.npz"
    locked = locked_outputs(root)
    md5 = _split_md5(file)
    stage, locked_md5 = locked.get(relative(file, root), (None, None))
    state = "unlocked" if locked_md5 is None else "locked" if locked_md5 == md5 else "modified"
    raw_dir = Path(cfg.paths.raw_dir)
    raw_stage = locked.get(relative(raw_dir, root))
    return SplitRecord(
        path=relative(file, root),
        sha256=_split_sha256(file),
        md5=md5,
        dvc_lock=state,
        stage=stage,
        raw={
            "path": relative(raw_dir, root),
            "md5": raw_stage[1] if raw_stage else "unlocked",
            "verified": raw_verified(raw_dir),
        },
    )


def raw_verified(raw_dir: Path) -> bool | None:
    """provenance.json's `verified` for a raw dataset folder, None without one."""
    try:
        return bool(json.loads((raw_dir / "provenance.json").read_text())["verified"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
