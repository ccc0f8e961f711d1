"""The SQLite store under faults: processes starting at once on a new or old-schema store, a
store this user may not write."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import stage_env
from dlilabs.ground.config import compose
from dlilabs.ground.errors import UserError
from dlilabs.tracking.store import connect, schema_revision

# A process that imports everything, says it is ready, waits for the go file, then connects:
# the test starts them all within milliseconds, so they really race for the new store.
CONNECT_AT_ONCE = """
import sys, time
from pathlib import Path
import alembic.command, mlflow.store.tracking.sqlalchemy_store  # imported before the start
from dlilabs.ground.config import compose
from dlilabs.tracking.store import connect
tracking = compose().tracking
Path(sys.argv[1]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.002)
print("experiment", connect(tracking))
"""
# MLflow 2.x's last schema before MLflow 3's logged-model tables (alembic revision).
OLD_REVISION = "0584bdc529eb"


def head_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def connect_at_once(project: Path, count: int) -> list[subprocess.CompletedProcess]:
    """Start `count` processes connecting to the project's store at the same instant."""
    gate = project / "gate"
    gate.mkdir()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONNECT_AT_ONCE, str(gate / f"ready{i}"), str(gate / "go")],
            env=stage_env(project),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    deadline = time.monotonic() + 120
    while len(list(gate.glob("ready*"))) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    (gate / "go").touch()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


def make_old_store(database: Path, revision: str) -> None:
    """A store as an older MLflow left it: its schema at `revision`, with experiment 7,
    'dlilabs', made back then."""
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config, create_sqlalchemy_engine
    from mlflow.store.tracking.dbmodels.initial_models import Base

    uri = f"sqlite:///{database}"
    engine = create_sqlalchemy_engine(uri)
    Base.metadata.create_all(engine)
    config = _get_alembic_config(uri)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:
        connection.execute(
            "insert into experiments (experiment_id, name, artifact_location, lifecycle_stage)"
            " values (7, 'dlilabs', ?, 'active')",
            (str(database.parent / "mlartifacts"),),
        )


@pytest.mark.slow
def test_processes_starting_at_once_on_a_new_store_all_connect(project):
    results = connect_at_once(project, 4)

    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    ids = {result.stdout.split()[-1] for result in results}
    assert len(ids) == 1, "every process must find the one experiment"
    assert schema_revision(project / "mlflow.db") == head_revision()
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    assert [e.name for e in client.search_experiments()].count("dlilabs") == 1


@pytest.mark.slow
def test_processes_starting_at_once_upgrade_an_old_store_once(project):
    database = project / "mlflow.db"
    make_old_store(database, OLD_REVISION)

    results = connect_at_once(project, 4)

    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert {result.stdout.split()[-1] for result in results} == {"7"}  # the old experiment
    assert schema_revision(database) == head_revision()
    # The store as it was before the upgrade is kept, once.
    assert [p.name for p in project.glob("mlflow.db.before-*")] == [
        f"mlflow.db.before-{OLD_REVISION}"
    ]
    assert schema_revision(project / f"mlflow.db.before-{OLD_REVISION}") == OLD_REVISION
    upgraded = sum("older schema" in result.stderr for result in results)
    assert upgraded == 1, "one process upgrades, the others find it done"


@pytest.mark.slow
def test_four_trains_starting_at_once_on_a_new_store_all_finish(project, tiny_mnist):
    command = [sys.executable, "-m", "dlilabs.train", "experiment=mnist_mlp"]
    command += ["model.hidden_units=[8]", "trainer.epochs=1"]
    processes = [
        subprocess.Popen(
            [*command, f"paths.model_dir={project}/models/job{i}"],
            env=stage_env(project),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(4)
    ]
    outputs = [process.communicate(timeout=600)[0] for process in processes]

    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    # Each process ended without Python's teardown (startup.run_command) yet closed the store:
    # its write-ahead log is folded in, so mlflow.db alone (a copy, a backup) has every run.
    assert not (project / "mlflow.db-wal").exists()
    copy = shutil.copy(project / "mlflow.db", project / "copy.db")
    client = MlflowClient(f"sqlite:///{copy}")
    experiment = client.get_experiment_by_name("dlilabs")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.status for run in runs) == ["FINISHED"] * 4


def test_a_deleted_experiment_is_a_user_error(project):
    tracking = compose().tracking
    mlflow.MlflowClient(tracking.uri).delete_experiment(connect(tracking))

    with pytest.raises(UserError, match="experiment 'dlilabs' is deleted"):
        connect(tracking)


def test_a_missing_store_folder_is_created(project):
    tracking = compose([f"paths.store_dir={project}/deep/store"]).tracking

    connect(tracking)

    assert (project / "deep" / "store" / "mlflow.db").is_file()


@contextlib.contextmanager
def read_only(path: Path):
    """Make `path` unwritable for the process the test starts: immutable (chattr +i) when
    tests run as root, whom permissions do not stop; chmod a-w otherwise."""
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(path)]).returncode != 0:
            pytest.skip("running as root and this filesystem has no immutable files")
        try:
            yield
        finally:
            subprocess.run([chattr, "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            path.chmod(mode)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_read_only_store_fails_with_one_line(project, tiny_mnist, what):
    store = project / "store"
    tracking = compose([f"paths.store_dir={store}"]).tracking
    connect(tracking)  # a working store with its schema
    database = store / "mlflow.db"

    with read_only(database if what == "file" else store):
        result = subprocess.run(
            [sys.executable, "-m", "dlilabs.train", "experiment=mnist_mlp", "trainer.epochs=1"],
            env=stage_env(project, DLILABS_STORE_DIR=str(store)),
            capture_output=True,
            text=True,
            timeout=300,
        )

    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert str(database if what == "file" else store) in errors[0]
    assert "writable" in errors[0] and "DLILABS_STORE_DIR" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (project / "models" / "mnist_mlp" / "model.keras").exists()
