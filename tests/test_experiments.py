"""DVC experiments: `dvc exp run -S` changes one lab, `dvc exp show` lists it, and the
matching MLflow run carries the experiment's name, queued runs in DVC's temporary folders
included (they log to the project's own store)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

import conftest
from conftest import REPO, command_env
from dlilabs.demo import make_workspace

pytestmark = pytest.mark.slow


def run(workspace: Path, *command: str, timeout: int = 900) -> str:
    """Run a command in `workspace` with this environment's dvc/python first on PATH and no
    store override: the stages must find the store themselves."""
    result = subprocess.run(
        command,
        cwd=workspace,
        env=command_env(drop=("DLILABS_ROOT",)),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def dvc(workspace: Path, *args: str) -> str:
    result = conftest.dvc(workspace, *args)
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A committed git + DVC repo with one small image lab on the bundled MNIST rows."""
    workspace = make_workspace(REPO, tmp_path_factory.mktemp("exp") / "repo", epochs=1, git=True)
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["labs"] = {
        "mnist_mlp": {
            "dataset": "mnist_demo",
            "overrides": "trainer.epochs=1 model.hidden_units=[32]",
        }
    }
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(workspace, "git", "add", "-A")
    run(
        workspace,
        "git",
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.com",
        "commit",
        "-qm",
        "baseline",
    )
    return workspace


def runs_tagged(workspace: Path, experiment_name: str) -> list:
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    experiment = client.get_experiment_by_name("dlilabs-demo")
    return client.search_runs(
        [experiment.experiment_id], f"tags.`dvc.experiment` = '{experiment_name}'"
    )


def test_exp_run_set_param_is_listed_and_tagged_in_mlflow(repo):
    dvc(
        repo,
        "exp",
        "run",
        "-n",
        "narrow",
        "-S",
        "labs.mnist_mlp.overrides='trainer.epochs=1 model.hidden_units=[16]'",
    )
    shown = json.loads(dvc(repo, "exp", "show", "--json"))
    assert "narrow" in json.dumps(shown)
    assert "eval/mnist_mlp/metrics.json" in json.dumps(shown)
    (tagged,) = [r for r in runs_tagged(repo, "narrow") if r.info.run_name == "mnist_mlp"]
    assert tagged.info.status == "FINISHED"
    assert tagged.data.params["model.hidden_units"] == "[16]"
    assert tagged.data.tags["dvc.stage"] == "train@mnist_mlp"


def test_queued_experiment_in_a_temp_folder_logs_to_the_project_store(repo):
    dvc(
        repo,
        "exp",
        "run",
        "--queue",
        "-n",
        "queued",
        "-S",
        "labs.mnist_mlp.overrides='trainer.epochs=1 model.hidden_units=[8]'",
    )
    dvc(repo, "queue", "start")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = dvc(repo, "queue", "status")
        if "queued" in status and ("Success" in status or "Failed" in status):
            break
        time.sleep(5)
    assert "Success" in status, status + dvc(repo, "queue", "logs", "queued")
    (tagged,) = [r for r in runs_tagged(repo, "queued") if r.info.run_name == "mnist_mlp"]
    assert tagged.info.status == "FINISHED"
    assert tagged.data.params["model.hidden_units"] == "[8]"
    # It ran in DVC's temporary copy, yet logged here, where the team looks.
    assert ".dvc/tmp/exps" in tagged.data.tags.get("dlilabs.workdir", "")
    assert "queued" in dvc(repo, "exp", "show", "--json")
