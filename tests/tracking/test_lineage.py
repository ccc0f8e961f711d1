"""Lineage through the real store: the splits as MLflow dataset inputs tied to DVC, the tags a
reproduction replays, model cards for registered versions, system metrics and run cost."""

from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from conftest import make_images, stage_env, write_prepared
from dlilabs import tracking
from dlilabs.ground.config import compose
from dlilabs.tracking.cards import card_markdown, verdict
from dlilabs.tracking.dvcdata import arrays_sha256
from dlilabs.tracking.lineage import run_datasets

HIDDEN = 16  # Flatten -> Dense 16 -> Dense 10: 784*16 + 16 + 16*10 + 10 parameters
TINY = ["experiment=mnist_mlp", f"model.hidden_units=[{HIDDEN}]", "trainer.epochs=2"]


def log_splits(overrides: list[str]) -> str:
    """Open a run in the project's store, log the splits as its inputs, return its id."""
    cfg = compose(overrides)
    tracking.connect(cfg.tracking)
    with tracking.lab_run("datasets") as run:
        tracking.log_datasets(cfg)
    return run.info.run_id


def inputs_of(root: Path, run_id: str) -> dict[str, dict]:
    """context -> the run's dataset input (name, digest, rows, source fields)."""
    run = MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(run_id)
    return {data["context"]: data for data in run_datasets(run)}


def test_same_data_gives_the_same_digest_in_another_folder(project, tiny_mnist, monkeypatch):
    """Two projects, the same arrays in .npz files whose bytes differ (one compressed): equal
    dataset digests, sources named by their DVC paths, not by where the folders are."""
    first = inputs_of(project, log_splits(["dataset=mnist"]))
    other = project.parent / "elsewhere" / "project"
    other.mkdir(parents=True)
    (other / "conf").symlink_to(project / "conf")
    for split, count, seed in (("train", 320, 1), ("val", 80, 2)):
        images, labels = make_images(count, 10, seed)
        folder = other / "data" / "prepared" / "mnist"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / f"{split}.npz", x=images, y=labels)
    monkeypatch.setenv("DLILABS_ROOT", str(other))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # set by the first connect
    second = inputs_of(other, log_splits(["dataset=mnist"]))

    for context, rows in (("training", 320), ("validation", 80)):
        a, b = first[context], second[context]
        assert a["digest"] == b["digest"] and len(a["digest"]) == 32
        assert a["md5"] != b["md5"]  # the files differ byte for byte; the data does not
        assert a["path"] == b["path"] == f"data/prepared/mnist/{a['name'].split('/')[1]}.npz"
        assert a["rows"] == b["rows"] == rows
        assert a["dvc_lock"] == "unlocked" and a["raw"]["md5"] == "unlocked"
    assert first["training"]["name"] == "mnist/train"
    assert first["training"]["digest"] != first["validation"]["digest"]


def test_published_range_verdicts():
    published = dict(compose(["experiment=asl_cnn_aug"]).published)
    assert published["metric"] == "best/val/accuracy"
    inside, below = {"best/val/accuracy": 0.99}, {"best/val/accuracy": 0.9}
    assert verdict(published, inside, "asl").startswith("inside")
    assert verdict(published, below, "asl").startswith("below")
    assert verdict(published, {}, "asl").startswith("unknown")
    assert verdict(published, inside, "mnist_demo").startswith("not comparable")
    line = dict(compose(["experiment=line_fit"]).published)
    assert "14.879" in verdict(line, {"fit/mse": 15.0}, "line")


def test_demo_card_says_it_is_not_the_lab_model(project):
    """A demo run (asl_cnn on MNIST rows): no 'inside', the demo limit and J/Z named."""
    cfg = compose(["experiment=asl_cnn", "dataset=mnist_demo", "profile=demo"])
    tracking.connect(cfg.tracking)
    with tracking.lab_run("demo card") as run:
        tracking.log_config(cfg)
        tracking.log_metrics({"final/val/accuracy": 0.96, "best/val/accuracy": 0.97})
    stored = MlflowClient(f"sqlite:///{project}/mlflow.db").get_run(run.info.run_id)
    assert "published.range" not in stored.data.params  # reference numbers are not params
    card = card_markdown("demo_asl_cnn", "1", stored, dict(cfg.published), None)
    summary = card.splitlines()[1]
    assert summary.startswith("> demo_asl_cnn v1 · cnn") and "not comparable" in summary
    assert "- Trained on mnist_demo, not asl (a demo run on MNIST rows)" in card
    assert "no J or Z" in card and "not yet drawn" in card


def system_metric_names(client: MlflowClient, run_id: str) -> set[str]:
    return {name for name in client.get_run(run_id).data.metrics if name.startswith("system/")}


@pytest.mark.parametrize("enabled", [True, False])
def test_system_metrics_follow_the_tracking_config(project, enabled):
    cfg = compose(
        [f"tracking.system_metrics={str(enabled).lower()}", "tracking.system_metrics_interval=1"]
    )
    tracking.connect(cfg.tracking)
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    with tracking.lab_run("system", tracking_cfg=cfg.tracking) as run:
        # MLflow samples in its thread "SystemMetricsMonitor": running exactly when enabled.
        sampling = any(t.name == "SystemMetricsMonitor" for t in threading.enumerate())
        assert sampling is enabled
        deadline = time.monotonic() + 30
        while enabled and not system_metric_names(client, run.info.run_id):
            assert time.monotonic() < deadline, "no system metric logged within 30 s"
            time.sleep(0.2)
        peak_inside = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = client.get_run(run.info.run_id).data.metrics
    assert ("system/cpu_utilization_percentage" in metrics) is enabled
    assert ("system/system_memory_usage_megabytes" in metrics) is enabled
    assert not any(name.startswith("system/gpu") for name in metrics)  # no GPU here
    # The process's peak RSS in MiB as the run ended: between the two readings around its end.
    assert peak_inside <= metrics["memory/peak_mb"] <= peak_after


def run_stage(project: Path, stage: str, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", f"dlilabs.{stage}", *overrides],
        cwd=project,
        env=stage_env(project),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_train_and_evaluate_record_lineage_cost_and_a_model_card(project, tiny_mnist, capsys):
    """The real stages as subprocesses (Hydra apps): dataset inputs tied to a dvc.lock and the
    raw download's provenance, the overrides, epoch time and peak memory, the model card
    (artifact and registry description) that evaluate completes and predict summarises."""
    train_md5 = hashlib.md5((tiny_mnist / "train.npz").read_bytes()).hexdigest()
    lock = {
        "schema": "2.0",
        "stages": {
            "download@mnist": {"outs": [{"path": "data/raw/mnist", "md5": "0a1b.dir"}]},
            "preprocess@mnist": {
                "outs": [
                    {"path": "data/prepared/mnist/train.npz", "hash": "md5", "md5": train_md5},
                    {"path": "data/prepared/mnist/val.npz", "hash": "md5", "md5": "0" * 32},
                ]
            },
        },
    }
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    raw = project / "data" / "raw" / "mnist"
    raw.mkdir(parents=True)
    (raw / "provenance.json").write_text(json.dumps({"verified": False, "files": {}}))

    run_stage(project, "train", *TINY)
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    run_id = json.loads((project / "models/mnist_mlp/run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    tags = run.data.tags
    assert json.loads(tags["hydra.overrides"]) == TINY
    assert tags["data.verified"] == "false"
    assert tags["model.parameters"] == str(784 * HIDDEN + HIDDEN + HIDDEN * 10 + 10)
    assert tags["model.architecture"] == (
        f"Scale 1/255 → Flatten → Dense {HIDDEN} relu → Dense 10 softmax"
    )
    inputs = {data["context"]: data for data in run_datasets(run)}
    assert inputs["training"]["md5"] == train_md5 and inputs["training"]["dvc_lock"] == "locked"
    assert inputs["training"]["stage"] == "preprocess@mnist"
    assert inputs["validation"]["dvc_lock"] == "modified"  # dvc.lock names another md5
    assert inputs["training"]["raw"] == {
        "path": "data/raw/mnist",
        "md5": "0a1b.dir",
        "verified": False,
    }
    assert inputs["training"]["sha256"] == arrays_sha256(tiny_mnist / "train.npz")
    epoch_seconds = client.get_metric_history(run_id, "time/epoch_seconds")
    assert [m.step for m in epoch_seconds] == [1, 2] and all(m.value > 0 for m in epoch_seconds)
    assert run.data.metrics["memory/peak_mb"] > 200  # TensorFlow alone takes more

    version = client.get_model_version("mnist_mlp", "1")
    card = Path(client.download_artifacts(run_id, "model_card.md", str(project))).read_text()
    assert version.description == card
    summary = card.splitlines()[1]
    assert summary.startswith(f"> mnist_mlp v1 · mlp, {int(tags['model.parameters']):,} parameters")
    assert "mnist 320/80 rows" in summary and "published 0.976–0.982: below" in summary
    assert "not yet drawn" in card and "eval/val_accuracy" not in card

    run_stage(project, "evaluate", *TINY)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["eval.data.same"] == "true"
    assert len(run.inputs.dataset_inputs) == 2  # the same data: no new inputs
    card = client.get_model_version("mnist_mlp", "1").description
    assert f"runs:/{run_id}/plots/confusion.png" in card and "| eval/val_accuracy |" in card

    image = project / "digit.png"
    Image.fromarray(make_images(1, 10)[0][0]).save(image)
    from dlilabs.predict import main as predict

    assert predict(["models:/mnist_mlp@champion", str(image)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"model: models:/mnist_mlp@champion (10 classes); card: {summary[2:]}"

    write_prepared(tiny_mnist, 320, 40, 10)  # other validation data than the run trained on
    run_stage(project, "evaluate", *TINY)
    run = client.get_run(run_id)
    assert run.data.tags["eval.data.same"] == "false"
    contexts = sorted(data["context"] for data in run_datasets(run))
    assert contexts == ["evaluation", "training", "validation"]


def test_a_dataset_row_raced_in_by_a_parallel_job_is_retried_not_fatal():
    from dlilabs.tracking.lineage import retry_if_raced

    calls = []

    def log_input():  # the second try finds the row the other job inserted
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError('duplicate key value violates unique constraint "dataset_pk"')
        return "linked"

    assert retry_if_raced(log_input) == "linked" and len(calls) == 2

    def broken():
        calls.append(1)
        raise RuntimeError("no such table: datasets")

    calls.clear()
    with pytest.raises(RuntimeError, match="no such table"):
        retry_if_raced(broken)
    assert len(calls) == 1  # other errors are not retried
