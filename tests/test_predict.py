"""`python -m dlilabs.predict` with a real ASL model: trained and evaluated by the real stages
on learnable synthetic images, registered in a real SQLite store, champion alias set."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_images, stage_env, write_prepared
from dlilabs.config import compose
from dlilabs.evaluate import run as evaluate_run
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
        (["asl_mlp", bad_csv], "pixels.csv: expected the 784 columns pixel1..pixel784"),
        (["asl_mpl", good], "no model 'asl_mpl'"),
        (["models:/asl_mlp@best", good], "cannot load models:/asl_mlp@best"),
        ([tmp_path / "notes.png", good], "not a Keras model file"),
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
