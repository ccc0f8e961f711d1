"""The team tracking server (dlilabs.server): PostgreSQL + `mlflow server` on local ports,
training jobs logging to it in parallel, and what the jobs do when the server dies."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from conftest import stage_env, write_prepared
from dlilabs.config import compose
from dlilabs.errors import UserError
from dlilabs.tracking import server, store

TINY = ["experiment=mnist_mlp", "model.hidden_units=[32]", "tracking=server"]
JOBS = 4


@dataclass
class Stack:
    """PostgreSQL and an MLflow server over it, in `folder`; the server can die and return."""

    folder: Path
    postgres: server.Postgres
    port: int
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (or restart, same port and database) the MLflow server; wait for /health."""
        self.process = server.start_mlflow(
            self.postgres.dsn,
            self.folder / "artifacts",
            self.port,
            log_file=self.folder / "mlflow.log",
        )

    def kill(self) -> None:
        """SIGKILL the server and its workers, as a crash or an OOM kill would, and wait until
        its port is closed."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)):
                    return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def stack():
    """One PostgreSQL + MLflow server for the module, on free ports of 127.0.0.1. Its folder is
    outside pytest's root-only tmp tree: as root, PostgreSQL runs as another user."""
    folder = Path(tempfile.mkdtemp(prefix="dlilabs-server-"))
    folder.chmod(0o755)
    postgres = server.start_postgres(folder)
    running = Stack(folder, postgres, server.free_port())
    try:
        running.start()
        yield running
    finally:
        server.stop(running.process, postgres)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def use_server(stack, project, monkeypatch):
    """Point this process's MLflow at the server (models:/ URIs resolve against the global
    tracking URI), and back to nothing afterwards."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.uri)
    mlflow.set_tracking_uri(stack.uri)
    yield stack.uri
    mlflow.set_tracking_uri(None)


@dataclass
class Job:
    """One training process; its output goes to files (a pipe could fill up and block it)."""

    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return f"{self.stdout.read_text()}\n--- stderr ---\n{self.stderr.read_text()}"


def run_sweep(project: Path, uri: str, *overrides: str) -> Job:
    """Start one Hydra sweep of JOBS training jobs (seeds 0..JOBS-1), all running at once
    under the joblib launcher, logging to the server at `uri`."""
    stdout, stderr = project / "sweep.out", project / "sweep.err"
    command = [
        sys.executable,
        "-m",
        "dlilabs.train",
        "-m",
        *TINY,
        *overrides,
        "trainer.seed=" + ",".join(str(seed) for seed in range(JOBS)),
        "hydra/launcher=parallel",
        f"hydra.launcher.n_jobs={JOBS}",
    ]
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(
            command, env=stage_env(project, MLFLOW_TRACKING_URI=uri), stdout=out, stderr=err
        )
    return Job(process, stdout, stderr)


def experiment_runs(client: MlflowClient) -> list:
    """Every run of the `dlilabs` experiment on the server (none before the first job)."""
    experiment = client.get_experiment_by_name("dlilabs")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_client_settings_fail_fast(project, monkeypatch):
    for variable in store.HTTP_SETTINGS.values():
        monkeypatch.delenv(variable, raising=False)
    store.apply_client_settings(compose(["tracking=server"]).tracking)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "20"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    store.apply_client_settings(compose().tracking)  # sqlite: no http_* keys, nothing changes
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "20"


def test_a_dead_server_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{server.free_port()}"
    started = time.monotonic()
    with pytest.raises(MlflowException) as caught:  # what MLflow raises, deep in a job
        MlflowClient(uri).get_experiment_by_name("dlilabs")
    assert time.monotonic() - started < 10
    error = store.tracking_user_error(caught.value, uri)
    assert isinstance(error, UserError)
    assert str(error) == (
        f"lost the MLflow tracking server at {uri}: connection refused. "
        "Is it running? (make server)"
    )
    # Other hosts' failures (a dataset download) and other stores are not the server's.
    with pytest.raises(requests.ConnectionError) as other:
        requests.get(f"http://127.0.0.1:{server.free_port()}/data", timeout=5)
    assert store.tracking_user_error(other.value, uri) is None
    assert store.tracking_user_error(other.value, "sqlite:///mlflow.db") is None


@pytest.mark.slow
def test_parallel_sweep_logs_complete_runs_to_the_server(stack, project, use_server):
    write_prepared(project / "data" / "prepared" / "mnist", 320, 80, 10)
    sweep = run_sweep(project, stack.uri, "trainer.epochs=2")
    assert sweep.process.wait(900) == 0, sweep.output()

    client = MlflowClient(stack.uri)
    (parent,) = [r for r in experiment_runs(client) if r.data.tags.get("sweep") == "parent"]
    children = [
        r
        for r in experiment_runs(client)
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]
    assert parent.info.status == "FINISHED" and len(children) == JOBS
    assert parent.data.metrics["children"] == JOBS
    versions = {v.run_id: v.version for v in client.search_model_versions("name='mnist_mlp'")}
    images = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    for run in children:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "gap/accuracy")]
        assert steps == [1, 2]
        assert {"best/val/accuracy", "final/val/loss", "best_epoch"} <= set(run.data.metrics)
        artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "history.csv"} <= artifacts
        # The model: logged, registered (one version per job), loadable through the server.
        model = mlflow.pyfunc.load_model(f"models:/mnist_mlp/{versions[run.info.run_id]}")
        assert np.asarray(model.predict(images)).shape == (4, 10)
    # Artifacts went through the server into its own store, not into the project.
    assert any((stack.folder / "artifacts").rglob("MLmodel"))
    assert not (project / "mlartifacts").exists() and not (project / "mlflow.db").exists()


def wait_for_first_epochs(client: MlflowClient, before: set[str], sweep: Job) -> list:
    """Wait until every job's run has logged an epoch (gap/accuracy); return those runs."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert sweep.process.poll() is None, sweep.output()
        runs = [
            run
            for run in experiment_runs(client)
            if run.info.run_id not in before and "mlflow.parentRunId" in run.data.tags
        ]
        if len(runs) == JOBS and all("gap/accuracy" in run.data.metrics for run in runs):
            return runs
        time.sleep(1)
    pytest.fail("the jobs logged no epoch within 300 s")


def snapshot(client: MlflowClient) -> dict[str, dict]:
    """Every run's status and, per metric, the steps logged so far."""
    return {
        run.info.run_id: {
            "status": run.info.status,
            "metrics": {
                key: {m.step for m in client.get_metric_history(run.info.run_id, key)}
                for key in run.data.metrics
            },
        }
        for run in experiment_runs(client)
    }


@pytest.mark.slow
def test_jobs_fail_fast_when_the_server_dies_and_nothing_logged_is_lost(stack, project):
    write_prepared(project / "data" / "prepared" / "mnist", 3000, 100, 10)
    client = MlflowClient(stack.uri)
    before = {run.info.run_id for run in experiment_runs(client)}
    sweep = run_sweep(project, stack.uri, "trainer.epochs=200")
    try:
        killed_batch = wait_for_first_epochs(client, before, sweep)
        logged = snapshot(client)
        stack.kill()
        killed_at = time.monotonic()
        try:
            sweep.process.wait(90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the sweep still runs 90 s after the server died:\n{sweep.output()}")
        seconds = time.monotonic() - killed_at
    finally:
        if sweep.process.poll() is None:
            sweep.process.kill()
            sweep.process.wait(30)

    stderr = sweep.stderr.read_text()
    assert sweep.process.returncode == 2, sweep.output()
    assert f"error: lost the MLflow tracking server at {stack.uri}: " in stderr, sweep.output()
    assert "Is it running? (make server)" in stderr and "Traceback" not in stderr
    print(f"the sweep ended {seconds:.1f} s after the server was killed")

    # Same PostgreSQL, new server: every run and every step logged before the kill is there.
    stack.start()
    after = snapshot(client)
    for run_id, was in logged.items():
        assert run_id in after
        for key, steps in was["metrics"].items():
            assert steps <= after[run_id]["metrics"][key], (run_id, key)
        if was["status"] == "FINISHED":
            assert after[run_id]["status"] == "FINISHED"
    for run in killed_batch:
        assert after[run.info.run_id]["metrics"]["gap/accuracy"]
        # The server was gone when the job tried to mark its run FAILED, so it stays RUNNING.
        assert after[run.info.run_id]["status"] in ("RUNNING", "FAILED")
