"""`make clean` removes the pipeline's outputs and never a store: the MLflow store and the
team server's `.server/` stay, and it refuses (one line, nothing removed) while a folder it
would remove holds a team server's store, with a real PostgreSQL running from it or not."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO
from dlilabs.tracking import teamserver

REMOVED = ("data", "models", "eval", "logs", "build")
KEPT = ("mlflow.db", "mlartifacts/1/model.keras", ".server/mlflow.pgpass", ".venv/pyvenv.cfg")


def checkout(root: Path) -> Path:
    """A folder with the Makefile, its guard script, pipeline outputs and the stores."""
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "Makefile", root / "Makefile")
    shutil.copy2(REPO / "scripts" / "clean_guard.sh", root / "scripts" / "clean_guard.sh")
    for name in (*(f"{folder}/file" for folder in REMOVED), *KEPT):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("kept" if name in KEPT else "output")
    return root


def make_clean(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", "clean"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_clean_removes_outputs_and_keeps_the_stores(tmp_path):
    root = checkout(tmp_path / "project")
    result = make_clean(root)
    assert result.returncode == 0, result.stderr
    assert [name for name in REMOVED if (root / name).exists()] == []
    assert all((root / name).read_text() == "kept" for name in KEPT)


def test_make_help_says_what_clean_removes_and_keeps():
    shown = subprocess.run(["make", "help"], cwd=REPO, capture_output=True, text=True).stdout
    lines = {line.split()[1]: line for line in shown.splitlines() if line.startswith("  make ")}
    assert all(f"{folder}/" in lines["clean"] for folder in REMOVED)
    assert all(store in lines["clean"] for store in ("mlflow.db", "mlartifacts/", ".server/"))
    assert ".server/" in lines["server"]


def refused(result: subprocess.CompletedProcess, root: Path) -> str:
    """The one line of a refusal; checks that nothing was removed."""
    assert result.returncode != 0
    assert [name for name in REMOVED if not (root / name).exists()] == []
    # make's own closing line ("make: ***", or "make[1]: ***" when make test runs this)
    (line,) = [
        line for line in result.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)
    ]
    return line


@pytest.mark.slow
def test_clean_refuses_while_a_server_store_is_in_build():
    """A real PostgreSQL cluster made by the team server in build/server (the old default):
    refused while it runs and after it stops; once moved to .server/, cleaned and kept."""
    # Outside pytest's root-only tmp tree: as root, PostgreSQL runs as another user.
    root = checkout(Path(tempfile.mkdtemp(prefix="dlilabs-clean-")))
    root.chmod(0o755)
    postgres = teamserver.start_postgres(root / "build" / "server")
    try:
        line = refused(make_clean(root), root)
        assert "is running from build/server" in line
        assert f"pid {postgres.process.pid}" in line
    finally:
        teamserver.stop(postgres=postgres)
    try:
        line = refused(make_clean(root), root)
        assert "holds a tracking server's store" in line and "mv " in line

        shutil.rmtree(root / ".server")
        (root / "build" / "server").rename(root / ".server")
        result = make_clean(root)
        assert result.returncode == 0, result.stderr
        assert not (root / "build").exists()
        assert (root / ".server" / "postgres" / "PG_VERSION").is_file()
    finally:
        shutil.rmtree(root, ignore_errors=True)
