"""`python -m dlilabs.predict` with a real ASL model: trained and evaluated by the real stages
on learnable synthetic images, registered in a real SQLite store, champion alias set."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_images, stage_env, write_prepared
from dlilabs.evaluate import run as evaluate_run
from dlilabs.ground.config import compose
from dlilabs.predict import main
from dlilabs.train import run as train_run

LETTERS = "abcdefghiklmnopqrstuvwxy"
RAW_LABELS = [label for label in range(25) if label != 9]  # Kaggle's: no 9 (J)
TINY = ["experiment=asl_mlp", "model.hidden_units=[64]", "trainer.epochs=4"]
LINE = re.compile(r"^(?P<name>.+?): (?P<top>.+?)(  \(actual: (?P<actual>\w+)\))?$")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project with asl_mlp trained (models/asl_mlp/model.keras, registered as asl_mlp v1)
    and evaluated (alias champion) on 24-class synthetic images it learns well."""
    root = tmp_path_factory.mktemp("predict") / "project"
    shutil.copytree(REPO / "conf", root / "conf")
    write_prepared(root / "data" / "prepared" / "asl", 960, 96, 24)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DLILABS_ROOT", str(root))
        for variable in ("MLFLOW_TRACKING_URI", "DLILABS_STORE_DIR", "DVC_STAGE"):
            patch.delenv(variable, raising=False)
        train_run(compose(TINY))
        metrics = evaluate_run(compose(TINY))
    assert metrics["val"]["accuracy"] > 0.9, metrics  # else top-1 checks below mean nothing
    return root


@pytest.fixture(autouse=True)
def in_project(project, monkeypatch):
    monkeypatch.setenv("DLILABS_ROOT", str(project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def predict(capsys, *args) -> tuple[int, list[dict], str]:
    """Run the command in-process: (exit code, parsed prediction lines, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    parsed = []
    for line in out.splitlines()[1:]:
        match = LINE.match(line)
        assert match, line
        top = [(cls, float(p)) for cls, p in (pair.split() for pair in match["top"].split(", "))]
        parsed.append({"name": match["name"], "top": top, "actual": match["actual"]})
    return code, parsed, err


def sign_image(tmp_path: Path, letter: str, name: str, scale: int = 5) -> Path:
    """A synthetic sign of `letter` saved as an RGB image `scale` times larger than 28x28."""
    images, labels = make_images(96, 24, seed=7)
    index = int(np.flatnonzero(labels == LETTERS.index(letter))[0])
    picture = Image.fromarray(images[index]).resize((28 * scale, 28 * scale), Image.NEAREST)
    path = tmp_path / name
    picture.convert("RGB").save(path, quality=95)
    return path


def test_images_of_any_size_get_letters_and_probabilities(tmp_path, capsys):
    big_png = sign_image(tmp_path, "c", "c.png", scale=5)
    jpeg = sign_image(tmp_path, "y", "y.jpg", scale=9)
    code, lines, _ = predict(capsys, "asl_mlp", big_png, jpeg, "--top-k", "3")
    assert code == 0
    assert [line["name"] for line in lines] == ["c.png", "y.jpg"]
    assert [line["top"][0][0] for line in lines] == ["c", "y"]
    for line in lines:
        probabilities = [p for _, p in line["top"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1.001
        assert all(cls in LETTERS for cls, _ in line["top"])


def test_lab_name_alias_and_path_give_the_same_model(project, tmp_path, capsys):
    image = sign_image(tmp_path, "k", "k.png")
    outputs = {}
    for model in (
        "asl_mlp",
        "models:/asl_mlp@champion",
        "models:/asl_mlp/1",
        project / "models" / "asl_mlp" / "model.keras",
    ):
        code, lines, err = predict(capsys, model, image)
        assert code == 0, err
        outputs[str(model)] = lines[0]["top"]
    assert len({str(top) for top in outputs.values()}) == 1, outputs
    assert outputs["asl_mlp"][0][0] == "k"


def test_lab_without_a_registered_model_uses_the_project_file(project, tmp_path, capsys):
    copy = project / "models" / "my_asl" / "model.keras"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(project / "models" / "asl_mlp" / "model.keras", copy)
    code, lines, err = predict(capsys, "my_asl", sign_image(tmp_path, "b", "b.png"))
    assert code == 0, err
    assert lines[0]["top"][0][0] == "b"


def test_kaggle_csv_rows_show_predicted_and_actual_letters(tmp_path, capsys):
    images, labels = make_images(6, 24, seed=3)
    raw = [RAW_LABELS[label] for label in labels]  # as Kaggle writes them: y is 24
    header = "label," + ",".join(f"pixel{i}" for i in range(1, 785))
    rows = [
        f"{r}," + ",".join(map(str, image.ravel())) for r, image in zip(raw, images, strict=True)
    ]
    csv = tmp_path / "sign_mnist_test.csv"
    csv.write_text("\r\n".join([header, *rows]) + "\r\n")
    code, lines, _ = predict(capsys, "asl_mlp", csv, "--top-k", "1")
    assert code == 0
    assert [line["name"] for line in lines] == [f"sign_mnist_test.csv row {i}" for i in range(1, 7)]
    assert [line["actual"] for line in lines] == [LETTERS[label] for label in labels]
    assert [line["top"][0][0] for line in lines] == [line["actual"] for line in lines]


def test_bad_inputs_and_models_are_clear_errors(project, tmp_path, capsys):
    good = sign_image(tmp_path, "a", "a.png")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is text")
    bad_csv = tmp_path / "pixels.csv"
    bad_csv.write_text("label,p1,p2\n1,2,3\n")
    cases = [
        (["asl_mlp", tmp_path / "missing.jpg"], "missing.jpg: no such file"),
        (["asl_mlp", not_an_image], "notes.png: not a readable image"),
        (["asl_mlp", bad_csv], "pixels.csv header row: expected the 784 columns pixel1..pixel784"),
        (["asl_mpl", good], "no model 'asl_mpl'"),
        (["models:/asl_mlp@best", good], "cannot load models:/asl_mlp@best"),
        ([tmp_path / "notes.png", good], "notes.png: not a readable Keras model file"),
    ]
    for args, message in cases:
        code, _, err = predict(capsys, *args)
        assert code == 2, args
        assert err.startswith("error: ") and message in err, err


def test_command_line_exits_non_zero_without_a_traceback(project, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dlilabs.predict", "asl_mlp", str(tmp_path / "hand.jpg")],
        env=stage_env(project),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "hand.jpg: no such file" in result.stderr and "Traceback" not in result.stderr


def kaggle_csv(path: Path, images: np.ndarray, labels: list[int], header: list[str]) -> Path:
    """Write images (n, 28, 28) as a Kaggle-layout CSV whose columns are named `header`
    (label first, then the pixels in the order the header names them)."""
    pixels = [int(name.removeprefix("pixel")) - 1 for name in header[1:]]
    rows = [
        ",".join(map(str, [label, *image.ravel()[pixels]]))
        for label, image in zip(labels, images, strict=True)
    ]
    path.write_text("\n".join([",".join(header), *rows]) + "\n")
    return path


def test_csv_columns_are_read_by_name_with_the_preprocess_schema(tmp_path, capsys):
    images, labels = make_images(4, 24, seed=5)
    raw = [RAW_LABELS[label] for label in labels]
    names = [f"pixel{i}" for i in range(1, 785)]
    kaggle = kaggle_csv(tmp_path / "kaggle.csv", images, raw, ["label", *names])
    flipped = kaggle_csv(tmp_path / "flipped.csv", images, raw, ["label", *names[::-1]])
    code, straight, _ = predict(capsys, "asl_mlp", kaggle)
    assert code == 0
    code, reversed_lines, _ = predict(capsys, "asl_mlp", flipped)
    assert code == 0
    assert [line["top"] for line in reversed_lines] == [line["top"] for line in straight]
    repeated = tmp_path / "repeated.csv"
    repeated.write_text(kaggle.read_text().replace("pixel3,", "pixel2,", 1))
    code, _, err = predict(capsys, "asl_mlp", repeated)
    assert code == 2 and "missing pixel3; repeated pixel2" in err, err


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A real PNG whose header claims width x height grey pixels; Pillow reads the header,
    and refuses the size, before it would decode any data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1))  # one scanline: enough for the header to parse
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (10000, 10000)])
def test_an_image_over_the_decompression_bomb_limit_is_an_error(tmp_path, capsys, width, height):
    """Pillow raises above twice its limit (20000^2) and only warns between (10000^2)."""
    image = bomb_png(tmp_path / "huge.png", width, height)
    code, _, err = predict(capsys, "asl_mlp", image)
    assert code == 2
    assert err.startswith("error: ") and "huge.png: too large to open safely" in err, err
    assert f"({width * height} pixels)" in err and len(err.strip().splitlines()) == 1


def test_a_model_file_with_an_unknown_class_is_one_line(project, tmp_path, capsys):
    """A .keras file whose config names a layer class this Keras lacks (a custom layer)."""
    source = project / "models" / "asl_mlp" / "model.keras"
    with zipfile.ZipFile(source) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    flatten = next(
        layer for layer in config["config"]["layers"] if layer["class_name"] == "Flatten"
    )
    flatten.update(class_name="FancyFlatten", module="mylab.layers")
    files["config.json"] = json.dumps(config).encode()
    custom = tmp_path / "custom.keras"
    with zipfile.ZipFile(custom, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    code, _, err = predict(capsys, custom, sign_image(tmp_path, "a", "a.png"))
    assert code == 2
    assert "custom.keras: holds the class 'FancyFlatten', which this Keras" in err, err
    assert len(err.strip().splitlines()) == 1 and "config" not in err


@pytest.mark.parametrize("top_k", ["0", "-2", "two"])
def test_top_k_must_be_a_positive_whole_number(tmp_path, capsys, top_k):
    with pytest.raises(SystemExit) as exit_:
        main(["asl_mlp", str(sign_image(tmp_path, "a", "a.png")), "--top-k", top_k])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --top-k:" in err and top_k in err and "Traceback" not in err
