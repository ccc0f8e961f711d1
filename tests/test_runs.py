"""`python -m dlilabs.runs list|reconcile`: the runs left RUNNING by a process that is gone."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from conftest import stage_env, write_prepared
from dlilabs.ground.config import compose
from dlilabs.runs import main
from dlilabs.tracking.reconcile import now_ms
from dlilabs.tracking.store import connect


def wait_for_an_epoch(database, timeout: float = 180) -> None:
    """Wait until a run has logged its first epoch's metrics."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            with sqlite3.connect(database) as connection:
                query = "select count(*) from metrics where key='gap/accuracy'"
                if connection.execute(query).fetchone()[0]:
                    return
        except sqlite3.OperationalError:
            pass  # no schema yet
    raise AssertionError(f"no epoch logged within {timeout} s")


def runs_cli(project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dlilabs.runs", *args],
        env=stage_env(project),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_sweep_killed_with_kill_9_is_listed_then_reconciled(project):
    write_prepared(project / "data" / "prepared" / "mnist", 3000, 100, 10)
    command = [sys.executable, "-m", "dlilabs.train", "-m", "experiment=mnist_mlp"]
    command += ["model.hidden_units=[32]", "trainer.epochs=500"]
    with open(project / "sweep.log", "w") as log:
        sweep = subprocess.Popen(command, env=stage_env(project), stdout=log, stderr=log)
        try:
            wait_for_an_epoch(project / "mlflow.db")
        finally:
            sweep.send_signal(signal.SIGKILL)
            sweep.wait(timeout=30)
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("dlilabs").experiment_id])
    assert sorted(run.data.tags.get("sweep") for run in runs) == ["child", "parent"]
    assert {run.info.status for run in runs} == {"RUNNING"}
    assert {run.data.tags["owner.pid"] for run in runs} == {str(sweep.pid)}

    listed = runs_cli(project, "list")

    assert listed.returncode == 0, listed.stderr
    for run in runs:
        assert run.info.run_id in listed.stdout
    assert f"process {sweep.pid} is gone" in listed.stdout
    assert "2 stale of 2 RUNNING runs in experiment 'dlilabs'" in listed.stdout
    assert {client.get_run(run.info.run_id).info.status for run in runs} == {"RUNNING"}

    reconciled = runs_cli(project, "reconcile")

    assert reconciled.returncode == 0, reconciled.stderr
    assert "Reconciled 2 run(s)." in reconciled.stdout
    for run in runs:
        ended = client.get_run(run.info.run_id)
        assert ended.info.status == "KILLED"
        # At its last heartbeat; the first one is taken just before MLflow stamps the start,
        # and a run never ends before it started (seen in a clean clone: 1 ms apart).
        assert ended.info.end_time == max(int(run.data.tags["heartbeat"]), run.info.start_time)
        assert f"ended {run.info.run_id}" in reconciled.stdout
    again = runs_cli(project, "list")
    assert "No stale runs" in again.stdout


def test_list_shows_another_host_s_run_once_its_heartbeat_is_older_than_the_timeout(
    project, capsys
):
    tracking = compose().tracking
    client = MlflowClient(tracking.uri)
    tags = {"owner.host": "node-7", "owner.pid": "42", "lab": "asl_cnn"}
    started = now_ms() - 45 * 60_000
    tags["heartbeat"] = str(started + 5 * 60_000)
    run_id = client.create_run(connect(tracking), started, tags).info.run_id

    assert main(["list", "--stale-after", "60"]) == 0
    assert "No stale runs" in capsys.readouterr().out

    assert main(["list"]) == 0  # tracking.stale_after_minutes: 30
    out = capsys.readouterr().out
    assert run_id in out and "asl_cnn" in out and "node-7" in out
    assert "40 min ago" in out and "no heartbeat from node-7 for 40 min" in out
    assert client.get_run(run_id).info.status == "RUNNING", "list changes nothing"


def test_an_unknown_experiment_or_store_is_one_error_line(project, capsys):
    connect(compose().tracking)
    capsys.readouterr()

    assert main(["list", "--experiment", "nope"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no experiment 'nope' in the MLflow store")
    assert "(experiments there: dlilabs, Default)" in error and error.count("\n") == 1

    assert main(["reconcile", "--tracking-uri", f"sqlite:///{project}/none/mlflow.db"]) == 2
    assert capsys.readouterr().err.startswith(f"error: no MLflow store at {project}/none")


def test_reconcile_on_a_read_only_store_is_one_error_line(project, capsys):
    import shutil

    tracking = compose().tracking
    connect(tracking)
    database = project / "mlflow.db"
    capsys.readouterr()  # what connecting printed
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(database)]).returncode != 0:
        pytest.skip("this filesystem has no immutable files")
    try:
        assert main(["reconcile", "--tracking-uri", tracking.uri]) == 2
    finally:
        subprocess.run([chattr, "-i", str(database)], check=True)
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and len(error.splitlines()) == 1
    assert str(database) in error
