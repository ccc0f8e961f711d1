"""`python -m dlilabs.compare` over a real store: three tiny ASL labs (MLP, CNN, CNN +
augmentation) trained and evaluated by the real stages, the MLP twice; and the `champion`
alias the evaluate stage moves between registered versions."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from conftest import REPO, stage_env, write_prepared
from dlilabs import compare
from dlilabs.evaluate import run as evaluate_run
from dlilabs.ground.config import compose
from dlilabs.tracking.registry import update_champion
from dlilabs.train import run as train_run

TINY_CNN = ["model.conv_blocks=[{filters:4,dropout:0.0}]", "model.dense_units=16"]
LABS = {
    "asl_mlp": ["experiment=asl_mlp", "model.hidden_units=[16]"],
    "asl_cnn": ["experiment=asl_cnn", *TINY_CNN],
    "asl_cnn_aug": ["experiment=asl_cnn_aug", *TINY_CNN],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A project whose store holds asl_cnn_aug, asl_cnn, then asl_mlp twice (2 epochs each;
    the second asl_mlp run with 3 epochs), each trained and evaluated by the real stages."""
    root = tmp_path_factory.mktemp("compare") / "project"
    shutil.copytree(REPO / "conf", root / "conf")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")  # the course's lab order
    write_prepared(root / "data" / "prepared" / "asl", 240, 48, 24)
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DLILABS_ROOT", str(root))
        for variable in ("MLFLOW_TRACKING_URI", "DLILABS_STORE_DIR", "DVC_STAGE"):
            patch.delenv(variable, raising=False)
        for lab, epochs in (("asl_cnn_aug", 2), ("asl_cnn", 2), ("asl_mlp", 2), ("asl_mlp", 3)):
            overrides = [*LABS[lab], f"trainer.epochs={epochs}"]
            runs.setdefault(lab, []).append(train_run(compose(overrides))["run_id"])
            evaluate_run(compose(overrides))
    return {"root": root, "uri": f"sqlite:///{root}/mlflow.db", "runs": runs}


@pytest.fixture
def in_project(store, monkeypatch) -> Path:
    monkeypatch.setenv("DLILABS_ROOT", str(store["root"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return store["root"]


def table_rows(markdown: str) -> list[list[str]]:
    """The data rows of a Markdown table, cells stripped."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_default_compares_the_latest_run_of_each_lab_in_course_order(
    store, in_project, tmp_path, capsys
):
    assert compare.main(["--experiment", "dlilabs", "--out", str(tmp_path)]) == 0
    rows = table_rows((tmp_path / "comparison.md").read_text())
    assert [row[0] for row in rows] == ["asl_mlp", "asl_cnn", "asl_cnn_aug"]  # MLP, CNN, aug
    assert [row[2:5] for row in rows] == [
        ["mlp", "none", "3"],
        ["cnn", "none", "2"],
        ["cnn", "dli", "2"],
    ]
    client = MlflowClient(store["uri"])
    latest_mlp = client.get_run(store["runs"]["asl_mlp"][-1])
    assert latest_mlp.info.run_id[:8] in rows[0][1]  # the newer of the two asl_mlp runs
    metrics = latest_mlp.data.metrics
    assert rows[0][5] == f"{metrics['best/val/accuracy']:.4f} ({int(metrics['best_epoch'])})"
    assert rows[0][6:9] == [
        f"{metrics['final/val/accuracy']:.4f}",
        f"{metrics['final/gap/accuracy']:.4f}",
        f"{metrics['eval/val_accuracy']:.4f}",
    ]
    assert "| asl_cnn_aug |" in capsys.readouterr().out  # the table is printed too
    with Image.open(tmp_path / "comparison.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > chart.size[1]


def test_all_runs_and_a_filter_select_runs(store, in_project, tmp_path):
    assert compare.main(["--all-runs", "--out", str(tmp_path)]) == 0
    rows = table_rows((tmp_path / "comparison.md").read_text())
    assert [row[0] for row in rows] == ["asl_mlp", "asl_mlp", "asl_cnn", "asl_cnn_aug"]
    assert [row[4] for row in rows[:2]] == ["2", "3"]  # oldest first within a lab

    assert compare.main(["--filter", "params.model.name = 'cnn'", "--out", str(tmp_path)]) == 0
    rows = table_rows((tmp_path / "comparison.md").read_text())
    assert [row[0] for row in rows] == ["asl_cnn", "asl_cnn_aug"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--filter", "params.model.name == cnn"], "is not a valid MLflow filter"),
        (["--filter", "tags.lab = 'no_such_lab'"], "no finished lab run"),
        (["--experiment", "nope"], "no experiment 'nope'"),
        (
            ["--tracking-uri", "sqlite:////nowhere/mlflow.db"],
            "no MLflow store at /nowhere/mlflow.db",
        ),
    ],
)
def test_bad_selections_are_one_clear_line(store, in_project, tmp_path, capsys, args, message):
    assert compare.main([*args, "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert not (tmp_path / "comparison.png").exists()


def test_command_line_error_exits_without_a_traceback(store, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dlilabs.compare", "--filter", "oops"],
        env=stage_env(store["root"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "oops" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_moves_the_champion_alias_only_to_a_better_version(store, in_project):
    """The evaluate stage, re-run on asl_mlp v2 (models/asl_mlp/run.json), against a holder
    v1 whose accuracy is set first out of reach (2.0), then below anything (-1.0)."""
    client = MlflowClient(store["uri"])
    first_run = store["runs"]["asl_mlp"][0]  # registered as v1
    overrides = [*LABS["asl_mlp"], "trainer.epochs=3"]
    client.set_registered_model_alias("asl_mlp", "champion", "1")
    client.log_metric(first_run, "eval/val_accuracy", 2.0)
    evaluate_run(compose(overrides))
    assert str(client.get_model_version_by_alias("asl_mlp", "champion").version) == "1"
    client.log_metric(first_run, "eval/val_accuracy", -1.0)
    evaluate_run(compose(overrides))
    assert str(client.get_model_version_by_alias("asl_mlp", "champion").version) == "2"


def test_update_champion_moves_the_alias_only_to_a_better_version(store):
    client = MlflowClient(store["uri"])
    holder = str(client.get_model_version_by_alias("asl_mlp", "champion").version)
    other = "1" if holder == "2" else "2"
    other_run = client.get_model_version("asl_mlp", other).run_id
    holder_accuracy = client.get_run(
        client.get_model_version("asl_mlp", holder).run_id
    ).data.metrics["eval/val_accuracy"]
    client.log_metric(other_run, "eval/val_accuracy", holder_accuracy - 0.01)
    assert not update_champion(client, "asl_mlp", other)
    assert str(client.get_model_version_by_alias("asl_mlp", "champion").version) == holder
    client.log_metric(other_run, "eval/val_accuracy", holder_accuracy + 0.01)
    assert update_champion(client, "asl_mlp", other)
    assert str(client.get_model_version_by_alias("asl_mlp", "champion").version) == other
