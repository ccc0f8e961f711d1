"""What a team sees when its S3 stores fail: one line naming the remote or bucket and what to
check, and nothing lost. Against moto's S3 server; with `auth`, moto checks credentials and
IAM policies as AWS does."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import write_prepared
from dlilabs.tracking import teamserver
from s3env import (
    client_env,
    kill_group,
    run,
    start_moto,
    start_team,
    stop_team,
)

DVC = [sys.executable, "-m", "dvc"]
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]

pytestmark = pytest.mark.team  # `make test-team` (CI), not `make test`


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = start_moto(
        "dvc", "mlflow", log=tmp_path_factory.mktemp("moto") / "moto.log", auth=True
    )
    yield server
    server.stop()


def set_remote(repo: Path, url: str, endpoint: str, credentials: dict) -> None:
    """Make `url` at `endpoint` the default remote `team` of `repo`, with `credentials` (AWS_*
    names) in .dvc/config.local: the files `dvc remote add -d`, `dvc remote modify` and
    `dvc remote modify --local` write (written directly: each dvc call costs seconds)."""
    remote = "'remote \"team\"'"
    config = (
        f"[core]\n    remote = team\n[{remote}]\n    url = {url}\n    endpointurl = {endpoint}\n"
    )
    (repo / ".dvc" / "config").write_text(config)
    key_id, secret = credentials["AWS_ACCESS_KEY_ID"], credentials["AWS_SECRET_ACCESS_KEY"]
    local = f"[{remote}]\n    access_key_id = {key_id}\n    secret_access_key = {secret}\n"
    (repo / ".dvc" / "config.local").write_text(local)


def dvc_repo(folder: Path, url: str, endpoint: str, credentials: dict) -> Path:
    """A git + DVC repo at `folder` whose default remote `team` is `url` at `endpoint`."""
    folder.mkdir(parents=True)
    env = client_env(folder)
    run(folder, env, "git", "init", "-q")
    run(folder, env, *DVC, "init", "-q")
    set_remote(folder, url, endpoint, credentials)
    return folder


@pytest.mark.slow
def test_unusable_buckets_are_one_line_naming_them(tmp_path, moto, monkeypatch, capsys):
    dead = f"http://127.0.0.1:{teamserver.free_port()}"
    wrong = {**moto.credentials, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    cases = {
        "unreachable": ("s3://dvc/x", dead, moto.credentials),
        "wrong credentials": ("s3://dvc/x", moto.endpoint, wrong),
        "missing bucket": ("s3://no-such-bucket/x", moto.endpoint, moto.credentials),
    }
    expected = {
        "unreachable": "cannot reach the S3 endpoint of {what} s3://dvc/x at " + dead,
        "wrong credentials": "S3 refused the credentials for {what} s3://dvc/x at " + moto.endpoint,
        "missing bucket": "the bucket 'no-such-bucket' of {what} s3://no-such-bucket/x",
    }
    repo = dvc_repo(tmp_path / "repo", "s3://dvc/x", moto.endpoint, moto.credentials)
    (repo / "data.txt").write_text("data\n")
    run(repo, client_env(repo), *DVC, "add", "-q", "data.txt")
    for index, (case, (url, endpoint, credentials)) in enumerate(cases.items()):
        # DVC's side: `python -m dlilabs.remote push` checks before `dvc push` goes anywhere.
        set_remote(repo, url, endpoint, credentials)
        pushed = run(
            repo, client_env(repo), sys.executable, "-m", "dlilabs.remote", "push", check=False
        )
        line = expected[case].format(what="DVC remote 'team'")
        assert pushed.returncode == 2, (case, pushed.stdout, pushed.stderr)
        assert pushed.stderr.startswith(f"error: {line}"), (case, pushed.stderr)
        assert len(pushed.stderr.splitlines()) == 1 and "dvc remote modify" in pushed.stderr
        # The tracking server's side: it refuses to start, before PostgreSQL.
        for key, value in {**credentials, "MLFLOW_S3_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        data_dir = tmp_path / f"server{index}"
        port = str(teamserver.free_port())
        code = teamserver.main(["--artifacts", url, "--data-dir", str(data_dir), "--port", port])
        err = capsys.readouterr().err
        line = expected[case].format(what="the tracking server's artifact store")
        assert code == 2 and err.startswith(f"error: {line}"), (case, err)
        assert len(err.splitlines()) == 1 and not data_dir.exists()
    assert moto.keys("dvc") == []  # nothing half-written


@pytest.mark.slow
def test_a_dvc_push_killed_halfway_completes_when_run_again(tmp_path, moto):
    repo = dvc_repo(tmp_path / "repo", "s3://dvc/killed", moto.endpoint, moto.credentials)
    env = client_env(repo)
    folder = repo / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(150):  # many objects: the push is still going when it is killed
        (folder / f"part{index:03}.bin").write_bytes(rng.bytes(100_000))
    run(repo, env, *DVC, "add", "-q", "data")
    run(repo, env, "git", "add", "-A")
    run(repo, env, *GIT, "commit", "-qm", "data")
    push = subprocess.Popen(
        [*DVC, "push"], cwd=repo, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(moto.keys("dvc", "killed/")) < 10 and time.monotonic() < deadline:
        assert push.poll() is None, "dvc push ended before it could be killed"
        time.sleep(0.05)
    kill_group(push)
    halfway = len(moto.keys("dvc", "killed/"))
    assert 10 <= halfway < 151  # 150 files and the directory's listing
    again = run(repo, env, *DVC, "push")
    assert "pushed" in again.stdout
    assert len(moto.keys("dvc", "killed/")) == 151

    # Everything arrived whole: a clone with its own cache pulls the exact bytes.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    (clone / ".dvc" / "config.local").write_text((repo / ".dvc" / "config.local").read_text())
    run(clone, client_env(clone), *DVC, "pull")
    for path in folder.iterdir():
        assert (clone / "data" / path.name).read_bytes() == path.read_bytes()


def train(project: Path, uri: str, *overrides: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "dlilabs.train", "experiment=mnist_mlp", "model.hidden_units=[32]",
        "tracking=server", *overrides,
    ]  # fmt: skip
    return subprocess.Popen(
        command, env=client_env(project, uri), cwd=project, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_an_artifact_store_failing_mid_run_fails_the_run_and_registers_nothing(project, tmp_path):
    write_prepared(project / "data" / "prepared" / "mnist", 1000, 100, 10)
    store = start_moto("mlflow", log=tmp_path / "moto.log")
    team = start_team(store, "s3://mlflow/artifacts")
    client = MlflowClient(team.uri)
    try:
        job = train(project, team.uri, "trainer.epochs=20")
        # The run has started and stored its config: now the object store dies while the job
        # trains, so the uploads at its end (history, model) fail on the server.
        deadline = time.monotonic() + 300
        while not [k for k in store.keys("mlflow") if k.endswith("config.yaml")]:
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.1)
        kill_group(store.process)
        stdout, stderr = job.communicate(timeout=600)
        assert job.returncode == 2, stdout + stderr
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1, stderr
        assert lines[0].startswith(
            f"error: the MLflow tracking server at {team.uri} failed to store or serve an "
            "artifact (HTTP 500 on /api/2.0/mlflow-artifacts/artifacts/"
        ), stderr
        assert lines[0].endswith("given to its --artifacts, and its log (mlflow.log)")
        assert "Traceback" not in stderr
        experiment = client.get_experiment_by_name("dlilabs")
        (failed,) = client.search_runs([experiment.experiment_id])
        assert failed.info.status == "FAILED"
        assert "gap/accuracy" in failed.data.metrics  # it was training when the store died
        assert client.search_model_versions("name='mnist_mlp'") == []  # nothing half-made

        # The store is back (moto keeps objects in memory: an empty bucket, same endpoint):
        # the next run finishes, its model registered and loadable through the server.
        store = start_moto("mlflow", log=tmp_path / "moto.log", port=store.port)
        job = train(project, team.uri, "trainer.epochs=1")
        stdout, stderr = job.communicate(timeout=600)
        assert job.returncode == 0, stdout + stderr
        (version,) = client.search_model_versions("name='mnist_mlp'")
        assert client.get_run(version.run_id).info.status == "FINISHED"
        mlflow.set_tracking_uri(team.uri)  # the test process has no S3 credentials either
        model = mlflow.pyfunc.load_model(f"models:/mnist_mlp/{version.version}")
        images = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.float32)
        answers = model.predict(images)  # raw pixels in, a class and probabilities out
        assert len(answers) == 3 and set(answers["class"]) <= set("0123456789")
    finally:
        mlflow.set_tracking_uri(None)
        stop_team(team)
        store.stop()
