"""Shared fixtures: a throwaway project folder, synthetic prepared data, a fresh MLflow store."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _restore_tracking_uri():
    """mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which would send the stages
    that later tests start as subprocesses to an earlier test's store: undo it after each."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder holding a copy of conf/; every stage path and the MLflow store
    (sqlite mlflow.db, mlartifacts/) resolve inside it."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "conf", root / "conf")
    monkeypatch.setenv("DLILABS_ROOT", str(root))
    for variable in ("MLFLOW_TRACKING_URI", "DLILABS_STORE_DIR", "DVC_STAGE", "DVC_EXP_NAME"):
        monkeypatch.delenv(variable, raising=False)
    return root


def make_images(count: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images: class k lights a bright 6x6 square at a class-specific
    place over noise. Returns uint8 (count, 28, 28) and int64 labels (count,)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 60, size=(count, 28, 28)).astype(np.uint8)
    for index, label in enumerate(labels):
        row, column = divmod(int(label) * 5, 22)
        images[index, row : row + 6, column : column + 6] = 230
    return images, labels.astype(np.int64)


def write_prepared(folder: Path, train_count: int, val_count: int, num_classes: int) -> Path:
    """Write train.npz / val.npz as the preprocess stage does, with `make_images` data."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, count, seed in (("train", train_count, 1), ("val", val_count, 2)):
        images, labels = make_images(count, num_classes, seed)
        np.savez(folder / f"{name}.npz", x=images, y=labels)
    return folder


@pytest.fixture
def tiny_mnist(project) -> Path:
    """Synthetic prepared `mnist` splits (320 train, 80 val) inside `project`."""
    return write_prepared(project / "data" / "prepared" / "mnist", 320, 80, 10)


def kaggle_zip(train: bytes, test: bytes, top_train: bytes | None = None) -> bytes:
    """A zip laid out like Kaggle's archive.zip: the train CSV at the top (`top_train`, default
    `train`) and in a folder, the test CSV only in a folder, and a picture."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("sign_mnist_train.csv", train if top_train is None else top_train)
        archive.writestr("sign_mnist_train/sign_mnist_train.csv", train)
        archive.writestr("sign_mnist_test/sign_mnist_test.csv", test)
        archive.writestr("amer_sign2.png", b"\x89PNG not really")
    return buffer.getvalue()


def command_env(drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """This process's environment for a command a test runs: this interpreter's bin/ first on
    PATH (its dvc, python), without an earlier test's store choice (MLFLOW_TRACKING_URI,
    DLILABS_STORE_DIR) or DVC's stage variable, less `drop`, plus `extra`."""
    dropped = {"MLFLOW_TRACKING_URI", "DLILABS_STORE_DIR", "DVC_STAGE", *drop}
    env = {key: value for key, value in os.environ.items() if key not in dropped}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def tiny_classifier():
    """(model, batches): a compiled 4-input, 2-class softmax model and 32 rows for it, as a
    tf.data dataset of 2 batches, for tests of the fitting loop itself."""
    import keras
    import tensorflow as tf

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(loss="categorical_crossentropy", metrics=["accuracy"])
    rows = np.random.default_rng(0).random((32, 4), dtype=np.float32)
    labels = keras.utils.to_categorical(np.arange(32) % 2, 2)
    return model, tf.data.Dataset.from_tensor_slices((rows, labels)).batch(16)


def store_runs(project: Path, experiment: str = "dlilabs") -> list:
    """Every run of `experiment` in the project's SQLite store (mlflow.db), as Run objects."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def stage_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for running a stage as a subprocess against the project at `root`."""
    return command_env(DLILABS_ROOT=str(root), **extra)


def dvc(
    workspace: Path,
    *args: str,
    check: bool = True,
    timeout: float = 900,
    store_dir: Path | None = None,
    drop: tuple[str, ...] = (),
    **extra: str,
) -> subprocess.CompletedProcess:
    """Run this interpreter's `dvc *args` in `workspace`, output captured as text. Its stages
    find the workspace's conf/ themselves (no DLILABS_ROOT) and log to `store_dir` when given
    (else the store they find). `check`: fail the test on a non-zero exit, showing the output."""
    env = command_env(drop=("DLILABS_ROOT", *drop), **extra)
    if store_dir is not None:
        env["DLILABS_STORE_DIR"] = str(store_dir)
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


class Handler(BaseHTTPRequestHandler):
    """Answers from `server.routes`: path -> list of (status, body, mode); each request takes
    the next entry and the last one repeats. mode "cut" promises more bytes than it sends."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.hits.append(self.path)
        answers = self.server.routes.get(self.path) or [(404, b"not found", "ok")]
        status, body, mode = answers.pop(0) if len(answers) > 1 else answers[0]
        self.send_response(status)
        extra = 1000 if mode == "cut" else 0
        self.send_header("Content-Length", str(len(body) + extra))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    """A threaded HTTP server on an ephemeral local port; `server.url(path)` builds URLs."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.routes, httpd.hits = {}, []
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_port}{path}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def demo_pipeline(tmp_path_factory) -> Path:
    """A git repo after the real `dvc repro` of the demo pipeline (bundled MNIST rows, one
    epoch per lab), its MLflow store inside (experiment dlilabs-demo). Shared: it takes minutes.
    Every lab of params.yaml, each run named after its lab (story=False: the pipeline's
    mechanics; tests/test_demo.py runs the demo's story itself)."""
    from dlilabs.demo import dvc, make_workspace

    workspace = make_workspace(
        REPO, tmp_path_factory.mktemp("demo") / "repo", epochs=1, git=True, story=False
    )
    with pytest.MonkeyPatch.context() as patch:
        # An earlier test's mlflow.set_tracking_uri may still be exported: the stages would
        # obey it over DLILABS_STORE_DIR.
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = dvc(workspace, "repro", store_dir=workspace, check=False)
    assert result.returncode == 0, "dvc repro of the demo pipeline failed: see the output above"
    return workspace


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> dict:
    """`python -m dlilabs.demo` as `make demo` runs it, into a temporary workspace and store
    (`store`): its output, its lab runs (`runs`) and its run "the story" (`story`). Shared by
    tests/test_demo.py and tests/test_ui.py: it takes minutes."""
    base = tmp_path_factory.mktemp("make-demo")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DLILABS_ROOT", "MLFLOW_TRACKING_URI", "DVC_STAGE")
    }
    env.update(
        DLILABS_STORE_DIR=str(base),
        PYTHONIOENCODING="utf-8",
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
    )
    result = subprocess.run(
        [sys.executable, "-m", "dlilabs.demo", "--workspace", str(base / "demo")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Every process of the demo (its stages, evaluate's forked side, compare, the story) ended
    # without Python's teardown yet closed the store: no write-ahead log is left beside it.
    assert not (base / "mlflow.db-wal").exists()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{base}/mlflow.db")
    experiment = client.get_experiment_by_name("dlilabs-demo")
    runs = client.search_runs([experiment.experiment_id])
    (story,) = [run for run in runs if run.data.tags.get("dlilabs.story") == "true"]
    return {
        "store": base,
        "experiment": experiment,
        "story": story,
        "workspace": base / "demo",
        "output": result.stdout,
        "log": result.stdout + result.stderr,  # dvc passes the stages' stderr through
        "runs": [run for run in runs if run is not story],
    }
