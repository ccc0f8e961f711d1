"""A team's two stores on S3 (moto's S3 server, started here): DVC's remote for data and
models, the tracking server's artifact store for what MLflow logs. Two clones in different
folders, each with its own DVC cache, play a workstation and a colleague (or a cluster node);
only the tracking server holds the artifact bucket's credentials."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from conftest import REPO, make_images, write_prepared
from dlilabs.demo import make_workspace
from s3env import KEY_ID, SECRET, client_env, run, start_moto, start_team, stop_team

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
DVC = [sys.executable, "-m", "dvc"]
REMOTE = "s3://dvc/dlilabs"
ARTIFACTS = "s3://mlflow/artifacts"
LAB = "mnist_mlp"
SWEEP, PARALLEL = 8, 4  # jobs of the many-writers sweep, and how many run at once
UNCACHED = [
    "data/prepared/mnist_demo/summary.json", "data/prepared/mnist_demo/samples.png",
    f"models/{LAB}/run.json",
]  # fmt: skip

pytestmark = pytest.mark.team  # `make test-team` (CI), not `make test`


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = start_moto("dvc", "mlflow", log=tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def team(moto):
    server = start_team(moto, ARTIFACTS)
    yield server
    stop_team(server)


def set_credentials(clone: Path, env: dict) -> None:
    """DVC's credentials for the remote, in .dvc/config.local (git ignores it), set as the
    README says. (A test may pass them as arguments; a user's shell would read them from a
    file or a variable: `dvc remote modify --local team secret_access_key "$SECRET"`.)"""
    run(clone, env, *DVC, "remote", "modify", "--local", "team", "access_key_id", KEY_ID)
    run(clone, env, *DVC, "remote", "modify", "--local", "team", "secret_access_key", SECRET)


def make_origin(folder: Path, moto, env: dict) -> tuple[Path, Path]:
    """A bare git repo `origin.git` and clone 1 of it: the demo pipeline with one small lab
    (32 hidden units, one epoch, logging to the tracking server), its DVC remote in moto."""
    origin, clone = folder / "origin.git", folder / "clone1"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    make_workspace(REPO, clone, epochs=1, git=True, story=False)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    lab = params["labs"][LAB]
    lab["overrides"] += " model.hidden_units=[32] tracking=server"
    (clone / "params.yaml").write_text(yaml.safe_dump({**params, "labs": {LAB: lab}}))
    run(clone, env, *DVC, "remote", "add", "-d", "team", REMOTE)
    run(clone, env, *DVC, "remote", "modify", "team", "endpointurl", moto.endpoint)
    set_credentials(clone, env)
    run(clone, env, "git", "add", "-A")
    run(clone, env, *GIT, "commit", "-qm", "code and the team's DVC remote")
    run(clone, env, "git", "remote", "add", "origin", str(origin))
    run(clone, env, "git", "push", "-q", "origin", "HEAD:main")
    return origin, clone


def outputs(clone: Path) -> dict[str, Path]:
    """Every file DVC tracks in `clone` (prepared splits, model, run.json, ...), by path."""
    folders = [clone / "data", clone / "models"]
    return {
        str(path.relative_to(clone)): path
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def write_png(path: Path) -> Path:
    images, _ = make_images(1, 10, seed=5)
    Image.fromarray(images[0]).save(path)
    return path


@pytest.mark.slow
def test_two_clones_share_data_models_and_experiments_through_s3(tmp_path, moto, team):
    env1 = client_env(tmp_path / "clone1", team.uri)
    origin, clone1 = make_origin(tmp_path, moto, env1)

    # Clone 1, the workstation: train, push the data and model to the remote, commit the lock.
    run(clone1, env1, *DVC, "repro", f"train@{LAB}")
    run(clone1, env1, sys.executable, "-m", "dlilabs.remote", "push")  # checks, dvc push
    # dvc.lock, and the metrics and plots DVC does not cache (`cache: false`): they travel by
    # git, which ignores data/ and models/ (hence -f).
    run(clone1, env1, "git", "add", "dvc.lock")
    run(clone1, env1, "git", "add", "-f", *UNCACHED)
    run(clone1, env1, *GIT, "commit", "-qm", "trained")
    run(clone1, env1, "git", "push", "-q", "origin", "HEAD:main")
    summary = json.loads((clone1 / f"models/{LAB}/run.json").read_text())
    before_exp = (clone1 / f"models/{LAB}/model.keras").read_bytes()
    assert len(moto.keys("dvc", "dlilabs/files/md5/")) >= 4  # splits, model, run.json, ...
    # The model the run logged went through the server into the artifact bucket.
    assert any(key.endswith("MLmodel") for key in moto.keys("mlflow", "artifacts/"))

    # Clone 2, a colleague: its own folder and DVC cache, its own credentials file.
    clone2 = tmp_path / "clone2"
    subprocess.run(["git", "clone", "-q", "-b", "main", str(origin), str(clone2)], check=True)
    env2 = client_env(clone2, team.uri)
    set_credentials(clone2, env2)
    assert not (clone2 / ".dvc" / "cache").exists()

    # Reproduce the run from its id: the splits come from the remote (the cache is empty).
    reproduced = run(
        clone2, env2, sys.executable, "-m", "dlilabs.reproduce", summary["run_id"], "--worktree",
        check=False,
    )  # fmt: skip
    assert reproduced.returncode == 0, reproduced.stdout + reproduced.stderr
    assert "metrics exactly equal" in reproduced.stdout

    pull = [sys.executable, "-m", "dlilabs.remote", "pull", "--with-deps", f"train@{LAB}"]
    run(clone2, env2, *pull)  # what clone 1 ran
    mine, theirs = outputs(clone1), outputs(clone2)
    assert f"models/{LAB}/model.keras" in mine and "data/prepared/mnist_demo/train.npz" in mine
    assert set(mine) == set(theirs)
    for name, path in mine.items():
        assert filecmp.cmp(path, theirs[name], shallow=False), name
    status = run(clone2, env2, *DVC, "status", f"train@{LAB}")
    assert "Data and pipelines are up to date." in status.stdout, status.stdout

    # The registered model, through the server: clone 2 has no S3 credentials at all.
    image = write_png(tmp_path / "digit.png")
    model_uri = f"models:/{summary['registered_model']}/{summary['registered_version']}"
    by_server = run(clone2, env2, sys.executable, "-m", "dlilabs.predict", model_uri, str(image))
    local = f"models/{LAB}/model.keras"
    by_file = run(clone2, env2, sys.executable, "-m", "dlilabs.predict", local, str(image))
    # Same model, same answer: the lines after each one's "model: ..." header.
    header, *answers = by_server.stdout.splitlines()
    assert header.startswith(f"model: {model_uri} ") and answers
    assert answers == by_file.stdout.splitlines()[1:]
    everything = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True)
    assert f"--artifacts-destination {ARTIFACTS}" in everything.stdout
    assert SECRET not in everything.stdout
    tracked = run(clone1, env1, "git", "log", "-p", "--all").stdout
    assert SECRET not in tracked and KEY_ID not in tracked
    assert SECRET in (clone2 / ".dvc" / "config.local").read_text()

    # A DVC experiment travels the same way: its commit through git, its outputs through S3.
    # The value is quoted for DVC's (Hydra's) override grammar: it holds `=` and spaces.
    overrides = f"labs.{LAB}.overrides='model.hidden_units=[32] tracking=server trainer.seed=1'"
    run(clone1, env1, *DVC, "exp", "run", "-n", "seed1", "-S", overrides, f"train@{LAB}")
    run(clone1, env1, *DVC, "exp", "push", "origin", "seed1")
    run(clone2, env2, *DVC, "exp", "pull", "origin", "seed1")
    shown = run(clone2, env2, *DVC, "exp", "show", "--json").stdout
    assert "seed1" in shown
    # The experiment's commit arrived by git, and its model by S3 into clone 2's cache, the
    # bytes clone 1 made. (`dvc exp apply` would also try the demo's stages never run here.)
    (ref,) = run(
        clone2, env2, "git", "for-each-ref", "--format=%(refname)", "refs/exps"
    ).stdout.split()
    lock = yaml.safe_load(run(clone2, env2, "git", "show", f"{ref}:dvc.lock").stdout)
    outs = {out["path"]: out for out in lock["stages"][f"train@{LAB}"]["outs"]}
    md5 = outs[f"models/{LAB}/model.keras"]["md5"]
    cached = clone2 / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    assert cached.read_bytes() == (clone1 / local).read_bytes() != before_exp  # another seed
    seed_run = json.loads(run(clone2, env2, "git", "show", f"{ref}:models/{LAB}/run.json").stdout)
    seed_run = seed_run["run_id"]
    assert seed_run != summary["run_id"]
    assert MlflowClient(team.uri).get_run(seed_run).data.params["trainer.seed"] == "1"


@pytest.mark.slow
def test_a_parallel_sweep_logs_every_model_to_the_bucket(project, moto, team):
    write_prepared(project / "data" / "prepared" / "mnist", 320, 80, 10)
    seeds = ",".join(str(seed) for seed in range(SWEEP))
    command = [
        sys.executable, "-m", "dlilabs.train", "-m", "experiment=mnist_mlp",
        "model.hidden_units=[16]", "tracking=server", "trainer.epochs=1", f"trainer.seed={seeds}",
        "hydra/launcher=parallel", f"hydra.launcher.n_jobs={PARALLEL}",
    ]  # fmt: skip
    run(project, client_env(project, team.uri), *command)

    client = MlflowClient(team.uri)
    experiment = client.get_experiment_by_name("dlilabs")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == SWEEP and {r.info.status for r in children} == {"FINISHED"}
    versions = {v.run_id: v.version for v in client.search_model_versions("name='mnist_mlp'")}
    keys = moto.keys("mlflow", "artifacts/")
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28)).astype(np.float32)
    mlflow.set_tracking_uri(team.uri)  # this process has no S3 credentials: all via the server
    try:
        for child in children:
            run_id = child.info.run_id
            for name in ("config.yaml", "history.csv"):  # in the bucket, under the run
                assert any(key.endswith(f"/{run_id}/artifacts/{name}") for key in keys), name
            model = mlflow.pyfunc.load_model(f"models:/mnist_mlp/{versions[run_id]}")
            answers = model.predict(images)  # raw pixels in, a class and probabilities out
            assert len(answers) == 2 and set(answers["class"]) <= set("0123456789")
    finally:
        mlflow.set_tracking_uri(None)
    assert sum(key.endswith("/MLmodel") for key in keys) >= SWEEP
