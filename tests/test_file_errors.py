"""Stages meet damaged inputs and full disks with one line naming the file and the way back,
exit code 2, and nothing half-written: no partial logged model, the MLflow run FAILED."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from conftest import stage_env
from dlilabs.evaluate import run as evaluate_run
from dlilabs.ground.config import compose
from dlilabs.ground.io import DamagedFile
from dlilabs.train import run as train_run
from mounts import tmpfs

TINY = ["experiment=mnist_mlp", "model.hidden_units=[32]", "trainer.epochs=1"]


def run_train(project, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m dlilabs.train` as a user runs it, in the project folder."""
    return subprocess.run(
        [sys.executable, "-m", "dlilabs.train", *TINY, *overrides],
        cwd=project,
        env=stage_env(project),
        capture_output=True,
        text=True,
        timeout=600,
    )


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_truncated_split_stops_train_with_one_line(project, tiny_mnist):
    split = tiny_mnist / "train.npz"
    split.write_bytes(split.read_bytes()[:5000])  # what an interrupted copy leaves
    done = run_train(project)
    assert done.returncode == 2, done.stderr[-3000:]
    assert error_lines(done.stderr) == [
        "error: data/prepared/mnist/train.npz is damaged: not a readable .npz archive of "
        "arrays x, y (File is not a zip file); restore it with `dvc checkout "
        "data/prepared/mnist/train.npz` or rebuild it with `dvc repro preprocess@mnist`"
    ]


def test_a_split_that_is_not_an_npz_is_a_user_error(project, tiny_mnist, monkeypatch):
    monkeypatch.chdir(project)
    (tiny_mnist / "val.npz").write_text("label,pixel1\n3,0\n")  # a CSV saved under the name
    with pytest.raises(DamagedFile, match=r"^data/prepared/mnist/val.npz is damaged: .*pickled"):
        train_run(compose(TINY))
    assert not (project / "models").exists()


def test_evaluate_names_each_damaged_train_output(project, tiny_mnist, monkeypatch):
    monkeypatch.chdir(project)
    train_run(compose(TINY))
    model_dir = project / "models" / "mnist_mlp"
    good = {name: (model_dir / name).read_bytes() for name in ("run.json", "model.keras")}
    damage = {
        "run.json": (b'{"run_id": "3f2', "not a readable JSON file (Unterminated string"),
        "model.keras": (good["model.keras"][:3000], "not a readable Keras model file"),
        "history.csv": (b"", "not a readable history CSV with columns epoch, train_accuracy"),
    }
    for name, (content, problem) in damage.items():
        intact = (model_dir / name).read_bytes()
        (model_dir / name).write_bytes(content)
        with pytest.raises(DamagedFile) as caught:
            evaluate_run(compose(TINY))
        message = str(caught.value)
        assert message.startswith(f"models/mnist_mlp/{name} is damaged: {problem}"), message
        assert message.endswith("rebuild it with `dvc repro train@mnist_mlp`"), message
        cached = name != "run.json"  # run.json is `cache: false` in dvc.yaml
        assert (f"`dvc checkout models/mnist_mlp/{name}`" in message) == cached, message
        (model_dir / name).write_bytes(intact)
    evaluate_run(compose(TINY))  # all restored: evaluate succeeds
    assert json.loads((project / "eval" / "mnist_mlp" / "metrics.json").read_text())["val"]


@pytest.mark.slow
def test_a_full_disk_while_logging_the_model_leaves_no_model_and_a_failed_run(
    project, tiny_mnist, tmp_path
):
    # The store's database stays in the project; its artifacts go to a 2 MB disk that holds
    # the run's config.yaml but not the model (a 1024-unit layer: 3 MB of weights).
    with tmpfs(tmp_path / "disk", size="2m") as disk:
        artifacts = disk / "mlartifacts"
        done = run_train(
            project, "model.hidden_units=[1024]", f"tracking.artifact_location={artifacts}"
        )
        assert done.returncode == 2, done.stderr[-3000:]
        lines = error_lines(done.stderr)
        assert len(lines) == 1 and "No space left on device" in lines[0], done.stderr[-3000:]
        assert lines[0].startswith(f"error: logging the model: cannot write {artifacts}/models/")
        assert "the disk is full" in lines[0]

        client = MlflowClient(f"sqlite:///{project}/mlflow.db")
        experiment = client.get_experiment_by_name("dlilabs")
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FAILED"
        # No model in the artifact store, none listed, none registered, none in models/.
        assert (artifacts / "models").is_dir()  # MLflow had started one there...
        assert list((artifacts / "models").iterdir()) == []  # ...and it is gone
        assert client.search_logged_models([experiment.experiment_id]) == []
        assert client.search_model_versions("name = 'mnist_mlp'") == []
        assert not (project / "models" / "mnist_mlp").exists()
        # What was logged before the model is whole: the run's resolved config.
        assert (artifacts / run.info.run_id / "artifacts" / "config.yaml").is_file()
        shutil.rmtree(artifacts)  # free the disk before it is unmounted


@pytest.mark.slow
def test_a_read_only_artifact_store_is_one_line_and_a_failed_run(project, tiny_mnist, tmp_path):
    # The first artifact (the run's config.yaml, written by MLflow itself) meets the mount.
    with tmpfs(tmp_path / "store", read_only=True) as store:
        done = run_train(project, f"tracking.artifact_location={store}/mlartifacts")
    assert done.returncode == 2, done.stderr[-3000:]
    assert error_lines(done.stderr) == [
        f"error: cannot write {store}/mlartifacts: Read-only file system (the folder is on a "
        "read-only file system); fix that, then run the command again"
    ]
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name("dlilabs")
    assert [run.info.status for run in client.search_runs([experiment.experiment_id])] == ["FAILED"]
