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
from dlilabs.ground.config import compose
from dlilabs.ground.errors import UserError
from dlilabs.tracking import postgres as pg
from dlilabs.tracking import store, teamserver

TINY = ["experiment=mnist_mlp", "model.hidden_units=[32]", "tracking=server"]
JOBS = 4


@dataclass
class Stack:
    """PostgreSQL and an MLflow server over it, in `folder`; the server can die and return."""

    folder: Path
    postgres: teamserver.Postgres
    port: int
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (or restart, same port and database) the MLflow server; wait for /health."""
        self.process = teamserver.start_mlflow(
            self.postgres,
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
    postgres = teamserver.start_postgres(folder)
    running = Stack(folder, postgres, teamserver.free_port())
    try:
        running.start()
        yield running
    finally:
        teamserver.stop(running.process, postgres)
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
    uri = f"http://127.0.0.1:{teamserver.free_port()}"
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
        requests.get(f"http://127.0.0.1:{teamserver.free_port()}/data", timeout=5)
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
    images = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32) * 255  # raw pixels
    for run in children:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "gap/accuracy")]
        assert steps == [1, 2]
        assert {"best/val/accuracy", "final/val/loss", "best_epoch"} <= set(run.data.metrics)
        artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "history.csv"} <= artifacts
        # The model: logged, registered (one version per job), loadable through the server.
        model = mlflow.pyfunc.load_model(f"models:/mnist_mlp/{versions[run.info.run_id]}")
        assert model.predict(images).shape == (4, 12)  # class, probability, ten digits
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


def psql_as_nobody(postgres: teamserver.Postgres, user: str, sql: str, password=None, host=None):
    """Run one statement with psql as the OS user `nobody` (anyone else with a shell on this
    host) against the cluster, as database role `user`; returns the CompletedProcess."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PGCONNECT_TIMEOUT": "10"}
    if password is not None:
        env["PGPASSWORD"] = password
    target = f"host={host or '127.0.0.1'} port={postgres.port} user={user} dbname={pg.DATABASE}"
    command = [pg.postgres_bin("psql"), "-w", "-X", "-At", target, "-c", sql]
    return subprocess.run(
        command, user="nobody", env=env, cwd="/", capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
def test_the_database_refuses_other_users_without_the_password(stack):
    postgres = stack.postgres
    role_password = pg.password(postgres.passfile)
    super_password = pg.password(stack.folder / pg.SUPERUSER_FILE)
    for user, password, expected in [
        (pg.ROLE, None, "no password supplied"),
        (pg.SUPERUSER, None, "no password supplied"),
        (pg.ROLE, "wrong-password", 'password authentication failed for user "mlflow"'),
        (pg.SUPERUSER, role_password, 'password authentication failed for user "postgres"'),
    ]:
        refused = psql_as_nobody(postgres, user, "SELECT 1", password)
        assert refused.returncode == 2 and expected in refused.stderr, (user, refused.stderr)
    # The socket sits in the cluster folder, which only the cluster's owner may enter.
    socket_try = psql_as_nobody(
        postgres, pg.SUPERUSER, "SELECT 1", super_password, host=str(postgres.cluster)
    )
    assert socket_try.returncode == 2 and "Permission denied" in socket_try.stderr

    # The passwords are the right ones: the superuser's is one, MLflow's role is not one.
    who = "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user"
    assert psql_as_nobody(postgres, pg.SUPERUSER, who, super_password).stdout == "t|t|t\n"
    assert psql_as_nobody(postgres, pg.ROLE, who, role_password).stdout == "f|f|f\n"
    copy = psql_as_nobody(postgres, pg.ROLE, "COPY (SELECT 1) TO PROGRAM 'true'", role_password)
    assert copy.returncode == 1
    assert "must be superuser or have privileges of the pg_execute_server_program" in copy.stderr
    owner = "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
    assert psql_as_nobody(postgres, pg.ROLE, owner, role_password).stdout == "mlflow\n"


@pytest.mark.slow
def test_passwords_are_in_private_files_and_on_no_command_line(stack):
    files = [stack.folder / pg.SUPERUSER_FILE, stack.postgres.passfile]
    assert [path.stat().st_mode & 0o777 for path in files] == [0o600, 0o600]
    # initdb, run as the cluster's user, reads the superuser's; MLflow, run as us, its role's.
    assert files[0].stat().st_uid == (stack.postgres.cluster / "PG_VERSION").stat().st_uid
    assert files[1].stat().st_uid == os.getuid()
    line = files[1].read_text().strip().split(":")  # libpq's format, for PGPASSFILE
    assert line[:4] == ["127.0.0.1", "*", "mlflow", "mlflow"] and len(line[4]) >= 30
    hba = (stack.postgres.cluster / "pg_hba.conf").read_text().splitlines()
    methods = {row.split()[-1] for row in hba if row.strip() and not row.startswith("#")}
    assert methods == {"scram-sha-256"}
    assert "@" not in stack.postgres.dsn.split("@")[0]  # no user:password@ in the URI
    everything = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True)
    assert f"--backend-store-uri {stack.postgres.dsn}" in everything.stdout
    for path in files:
        assert pg.password(path) not in everything.stdout


def make_old_cluster(folder: Path) -> str:
    """What dlilabs.server made before it was locked down: `initdb -A trust`, the superuser
    `mlflow` owning MLflow's tables. Returns the id of a FINISHED run logged to it."""
    cluster = folder / "postgres"
    cluster.mkdir(mode=0o700)
    run_as = pg._run_as(cluster)
    options = ["-U", "mlflow", "-A", "trust", "-E", "UTF8", "--locale=C"]
    initdb = [pg.postgres_bin("initdb"), "-D", str(cluster), *options]
    subprocess.run(initdb, check=True, capture_output=True, **run_as)
    port = teamserver.free_port()
    process = pg._launch(cluster, port, "127.0.0.1", run_as)
    try:
        params = dict(host="127.0.0.1", port=port, user="mlflow", dbname="postgres")
        pg._connect(process, cluster, 60, **params).cursor().execute("CREATE DATABASE mlflow")
        client = MlflowClient(f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow")
        run = client.create_run(client.create_experiment("old"))
        client.log_metric(run.info.run_id, "loss", 1.0, step=1)
        client.set_terminated(run.info.run_id)
        return run.info.run_id
    finally:
        pg.end(process, signal.SIGINT)


@pytest.mark.slow
def test_a_cluster_from_the_old_server_is_secured_and_keeps_its_runs(monkeypatch):
    folder = Path(tempfile.mkdtemp(prefix="dlilabs-old-server-"))
    folder.chmod(0o755)
    try:
        run_id = make_old_cluster(folder)
        postgres = teamserver.start_postgres(folder)
        try:
            hba = (postgres.cluster / "pg_hba.conf").read_text()
            assert "trust" not in hba.replace("#", " ").split()
            assert psql_as_nobody(postgres, "mlflow", "SELECT 1").returncode == 2
            who = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            role_password = pg.password(postgres.passfile)
            assert psql_as_nobody(postgres, "mlflow", who, role_password).stdout == "f\n"
            # MLflow's role owns the old tables: it reads the old run and writes to it.
            monkeypatch.setenv("PGPASSFILE", str(postgres.passfile))
            client = MlflowClient(postgres.dsn)
            assert client.get_run(run_id).info.status == "FINISHED"
            client.log_metric(run_id, "loss", 0.5, step=2)
            steps = [m.step for m in client.get_metric_history(run_id, "loss")]
            assert steps == [1, 2]
        finally:
            teamserver.stop(postgres=postgres)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_mlflow_login_refuses_anonymous_requests_and_takes_env_credentials(
    stack, project, monkeypatch
):
    port = teamserver.free_port()
    log_file = stack.folder / "mlflow-auth.log"
    process = teamserver.start_mlflow(
        stack.postgres, stack.folder / "artifacts", port, log_file=log_file, auth=True
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        files = [stack.folder / name for name in teamserver.AUTH_FILES.values()]
        assert [path.stat().st_mode & 0o777 for path in files] == [0o600] * len(files)
        admin_password = pg.password(stack.folder / teamserver.AUTH_FILES["admin"])
        search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(search, timeout=30).status_code == 401
        assert requests.get(search, auth=("admin", "wrong-password"), timeout=30).status_code == 401
        assert requests.get(search, auth=("admin", admin_password), timeout=30).status_code == 200

        write_prepared(project / "data" / "prepared" / "mnist", 64, 32, 10)
        job = [*TINY, "trainer.epochs=1", "tracking.experiment_name=login"]
        command = [sys.executable, "-m", "dlilabs.train", *job]
        credentials = dict(
            MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=admin_password
        )
        env = stage_env(project, MLFLOW_TRACKING_URI=uri, **credentials)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        for name, value in credentials.items():
            monkeypatch.setenv(name, value)
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("login").experiment_id])
        assert run.info.status == "FINISHED" and "val/accuracy" in run.data.metrics

        # Without them, MLflow's client is turned away too.
        for name in credentials:
            monkeypatch.delenv(name)
        with pytest.raises(MlflowException, match="error code 401"):
            MlflowClient(uri).get_experiment_by_name("login")
        # ... and a job without them stops with one line saying what to set.
        refused = subprocess.run(
            command, env=stage_env(project, MLFLOW_TRACKING_URI=uri), capture_output=True,
            text=True, timeout=600,
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert "Traceback" not in refused.stderr
        assert "MLFLOW_TRACKING_USERNAME" in refused.stderr.strip().splitlines()[-1]
    finally:
        teamserver.stop(process)
