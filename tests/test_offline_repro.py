"""Issue 9: `dvc repro` offline from files the user already has, in a temporary git+DVC repo.

The Kaggle zip sits in the workspace's `downloads/` folder; every mirror points at a closed
local port, and Keras' and kagglehub's caches at empty folders. The real `dvc repro` of the
download and preprocess stages must succeed from the zip, do nothing the second time, refuse
a copy whose sha256 is not an accepted one (saying how to accept it), and take it when told to.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

import conftest
from conftest import REPO, kaggle_zip
from dlilabs.demo import make_workspace
from dlilabs.tracking.postgres import free_port

pytestmark = pytest.mark.slow
ASL_LABELS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]


def sign_csv(rows: int, seed: int, newline: str = "\r\n") -> bytes:
    """A Sign Language MNIST CSV in Kaggle's layout (CRLF, as Kaggle ships it)."""
    rng = np.random.default_rng(seed)
    header = "label," + ",".join(f"pixel{i}" for i in range(1, 785))
    lines = [header] + [
        ",".join(map(str, [ASL_LABELS[row % 24], *rng.integers(0, 256, 784)]))
        for row in range(rows)
    ]
    return (newline.join(lines) + newline).encode()


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/sign-language-mnist.zip"


def dvc(workspace: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run this environment's dvc in `workspace`, offline: caches pointed at empty folders,
    no downloads folder or acceptance of the caller's."""
    accepting = tuple(key for key in os.environ if key.startswith("DLILABS_ACCEPT"))
    return conftest.dvc(
        workspace,
        *args,
        check=False,
        timeout=600,
        store_dir=workspace,
        drop=("DLILABS_DOWNLOADS", *accepting),
        KERAS_HOME=str(workspace.parent / "no-keras"),
        KAGGLEHUB_CACHE=str(workspace.parent / "no-kagglehub"),
        **env,
    )


def test_dvc_repro_offline_from_the_downloads_folder(tmp_path):
    train, test = sign_csv(48, 1), sign_csv(24, 2)
    workspace = make_workspace(REPO, tmp_path / "repo", epochs=1, git=True)
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    (workspace / "params.yaml").write_text(yaml.safe_dump({**params, "datasets": ["asl"]}))
    dataset_file = workspace / "conf" / "dataset" / "asl.yaml"
    dataset = yaml.safe_load(dataset_file.read_text())
    dataset["source"]["mirrors"] = [{"url": closed_port_url(), "archive": "zip"}]
    dataset["source"]["files"] = {
        "sign_mnist_train.csv": [hashlib.sha256(train).hexdigest()],
        "sign_mnist_test.csv": [hashlib.sha256(test).hexdigest()],
    }
    dataset_file.write_text(yaml.safe_dump(dataset, sort_keys=False))
    (workspace / "downloads").mkdir()
    (workspace / "downloads" / "archive.zip").write_bytes(kaggle_zip(train, test))

    # Offline, from the zip in downloads/.
    first = dvc(workspace, "repro", "preprocess@asl")
    output = first.stdout + first.stderr
    assert first.returncode == 0, output
    assert "Running stage 'download@asl'" in output and "Running stage 'preprocess@asl'" in output
    assert "downloads/archive.zip:sign_mnist_train.csv" in output  # where each file came from
    with np.load(workspace / "data/prepared/asl/train.npz") as prepared:
        assert prepared["x"].shape == (48, 28, 28)
    record = json.loads((workspace / "data/raw/asl/provenance.json").read_text())
    assert record["verified"] is True
    # downloads/ is neither git's nor DVC's business.
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=workspace, capture_output=True, text=True
    )
    assert "downloads" not in status.stdout

    second = dvc(workspace, "repro", "preprocess@asl")
    assert second.returncode == 0 and "Running stage" not in second.stdout + second.stderr

    # Another mirror's copy (LF line endings) in place of Kaggle's: refused, with the way out.
    (workspace / "downloads" / "archive.zip").write_bytes(
        kaggle_zip(sign_csv(48, 1, newline="\n"), test)
    )
    refused = dvc(workspace, "repro", "--force", "preprocess@asl")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0
    assert "error: could not get sign_mnist_train.csv" in output
    assert "checksum mismatch" in output and "DLILABS_ACCEPT_UNVERIFIED=1 dvc repro" in output
    assert "Traceback" not in output

    accepted = dvc(workspace, "repro", "--force", "preprocess@asl", DLILABS_ACCEPT_UNVERIFIED="1")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    record = json.loads((workspace / "data/raw/asl/provenance.json").read_text())
    assert record["verified"] is False
    assert record["files"]["sign_mnist_train.csv"]["verified"] is False
    assert record["files"]["sign_mnist_test.csv"]["verified"] is True
