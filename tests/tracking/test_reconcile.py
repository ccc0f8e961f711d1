"""No ghost runs: owners and heartbeats, and reconcile ending the runs whose owner is gone."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import stage_env, write_prepared
from dlilabs.ground.config import compose
from dlilabs.tracking.labrun import lab_run
from dlilabs.tracking.reconcile import Heartbeat, now_ms, owner_tags
from dlilabs.tracking.store import connect

MINUTE = 60_000


def start_train(project: Path, name: str) -> subprocess.Popen:
    """A real train of many epochs on the project's data, its output in <project>/<name>.log."""
    command = [sys.executable, "-m", "dlilabs.train", "experiment=mnist_mlp"]
    command += [
        "model.hidden_units=[32]",
        "trainer.epochs=500",
        f"paths.model_dir={project}/{name}",
    ]
    log = open(project / f"{name}.log", "w")  # noqa: SIM115 (the child writes it)
    return subprocess.Popen(command, env=stage_env(project), stdout=log, stderr=subprocess.STDOUT)


def runs_with_epochs(database: Path, count: int, timeout: float = 180) -> set[str]:
    """Wait until `count` runs have logged an epoch's metrics; their ids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            with sqlite3.connect(database) as connection:
                rows = connection.execute(
                    "select distinct run_uuid from metrics where key='gap/accuracy'"
                ).fetchall()
        except sqlite3.OperationalError:
            continue  # no schema yet
        if len(rows) >= count:
            return {row[0] for row in rows}
    raise AssertionError(f"fewer than {count} runs logged an epoch within {timeout} s")


@pytest.mark.slow
def test_a_killed_train_ends_at_its_last_heartbeat_and_a_live_one_goes_on(project):
    write_prepared(project / "data" / "prepared" / "mnist", 3000, 100, 10)
    doomed, alive = start_train(project, "doomed"), start_train(project, "alive")
    try:
        runs_with_epochs(project / "mlflow.db", 2)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=30)
        client = MlflowClient(f"sqlite:///{project}/mlflow.db")
        by_pid = {
            run.data.tags["owner.pid"]: run
            for run in client.search_runs([client.get_experiment_by_name("dlilabs").experiment_id])
        }
        ghost, live = by_pid[str(doomed.pid)], by_pid[str(alive.pid)]
        assert ghost.info.status == "RUNNING" and ghost.info.end_time is None
        assert ghost.data.tags["owner.host"] == socket.gethostname()
        last_heartbeat = int(ghost.data.tags["heartbeat"])
        assert last_heartbeat >= ghost.info.start_time

        connect(compose().tracking)  # what every stage does first

        ghost = client.get_run(ghost.info.run_id)
        assert ghost.info.status == "KILLED"
        assert ghost.info.end_time == last_heartbeat
        assert ghost.data.tags["reconciled"] == f"killed: process {doomed.pid} is gone"
        live = client.get_run(live.info.run_id)
        assert live.info.status == "RUNNING" and "reconciled" not in live.data.tags
        assert alive.poll() is None, "the live train must go on"
    finally:
        for process in (doomed, alive):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    assert client.get_run(live.info.run_id).info.status == "KILLED"  # by itself, on SIGTERM


def test_runs_of_other_hosts_end_only_after_the_timeout(project):
    tracking = compose(["tracking.stale_after_minutes=30"]).tracking
    experiment_id = connect(tracking)
    client = MlflowClient(tracking.uri)
    now = now_ms()

    def run_with(tags: dict) -> str:
        started = now - 180 * MINUTE
        tags = {key: str(value) for key, value in tags.items()}
        return client.create_run(experiment_id, start_time=started, tags=tags).info.run_id

    def owned(host, pid, start_time, heartbeat) -> dict:
        return {
            "owner.host": host,
            "owner.pid": pid,
            "owner.start_time": start_time,
            "heartbeat": heartbeat,
        }

    recent = run_with(owned("node-7", 123, 1.0, now - 10 * MINUTE))
    silent = run_with(owned("node-7", 123, 1.0, now - 40 * MINUTE))
    no_owner = run_with({"lab": "mnist_mlp"})  # made before runs recorded owners
    mine = client.create_run(experiment_id, tags=owner_tags()).info.run_id  # alive: this one
    # This host, our pid, but another process's start time: the owner is gone.
    reused = run_with(owned(socket.gethostname(), os.getpid(), 1000.0, now - MINUTE))

    connect(tracking)

    def state(run_id):
        run = client.get_run(run_id)
        return run.info.status, run.info.end_time, run.data.tags.get("reconciled")

    assert state(recent) == ("RUNNING", None, None)
    assert state(mine) == ("RUNNING", None, None)
    assert state(silent) == (
        "KILLED",
        now - 40 * MINUTE,
        "killed: no heartbeat from node-7 for 40 min",
    )
    assert state(no_owner)[:2] == ("KILLED", now - 180 * MINUTE)
    assert state(reused)[:2] == ("KILLED", now - MINUTE)
    assert "belongs to another process" in state(reused)[2]

    connect(compose(["tracking.stale_after_minutes=5"]).tracking)  # a shorter timeout

    assert state(recent)[:2] == ("KILLED", now - 10 * MINUTE)
    assert state(mine)[0] == "RUNNING"


def test_the_heartbeat_beats_until_the_run_ends(project):
    tracking = compose().tracking
    client = MlflowClient(tracking.uri)
    run_id = client.create_run(connect(tracking)).info.run_id
    heartbeat = Heartbeat(run_id, seconds=0.1).start()

    beats = set()
    deadline = time.monotonic() + 30
    while len(beats) < 3 and time.monotonic() < deadline:
        beats.add(client.get_run(run_id).data.tags.get("heartbeat"))
        time.sleep(0.05)
    assert len(beats - {None}) >= 2, "the heartbeat tag must move on while the run lasts"

    client.set_terminated(run_id, "FINISHED")
    deadline = time.monotonic() + 30
    while heartbeat.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not heartbeat.is_alive(), "the thread ends once its run has ended"


def test_a_lab_run_records_its_owner_and_stops_beating_when_it_ends(project):
    connect(compose().tracking)

    with lab_run("owned", {"lab": "mnist_mlp"}) as run:
        beating = [t for t in threading.enumerate() if t.name == f"heartbeat-{run.info.run_id}"]
        assert beating and beating[0].daemon

    finished = MlflowClient().get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    tags = finished.data.tags
    assert tags["owner.pid"] == str(os.getpid())
    assert tags["owner.host"] == socket.gethostname()
    assert abs(float(tags["owner.start_time"]) - owner_start_of_this_process()) < 1
    assert not beating[0].is_alive()


def owner_start_of_this_process() -> float:
    """This process's start time from /proc (Linux), independent of psutil."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc here")
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    boot = next(
        float(line.split()[1])
        for line in Path("/proc/stat").read_text().splitlines()
        if line.startswith("btime")
    )
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def test_a_run_whose_owner_is_a_zombie_is_ended(project):
    """A killed process its parent has not reaped yet (a zombie) owns nothing any more."""
    import psutil

    tracking = compose().tracking
    client = MlflowClient(tracking.uri)
    experiment_id = connect(tracking)
    owner = subprocess.Popen(["sleep", "600"])
    try:
        tags = {
            "owner.host": socket.gethostname(),
            "owner.pid": str(owner.pid),
            "owner.start_time": f"{psutil.Process(owner.pid).create_time():.2f}",
        }
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        connect(tracking)
        assert client.get_run(run_id).info.status == "RUNNING", "its owner is alive"

        owner.send_signal(signal.SIGKILL)
        while psutil.Process(owner.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
        connect(tracking)

        assert client.get_run(run_id).info.status == "KILLED"
    finally:
        owner.kill()
        owner.wait()
