"""`make bench` section `repro`: a whole `dvc repro`, timed end to end once; epochs vs the rest.

    python scripts/bench.py repro                      # ~35 min on a 2-core CPU machine
    SOURCE=<older checkout> python scripts/bench_repro.py   # the same for its conf/, src/

Not in the default `make bench` run (it trains every lab for its full epochs). In a scratch
DVC workspace holding a copy of SOURCE's conf/, src/, dvc.yaml and params.yaml (its own src/
first on PYTHONPATH, its own MLflow store), downloads/ gets random data in the real formats
and sizes (Kaggle's Sign Language MNIST CSVs, 27,455 + 7,172 rows; Keras' mnist.npz, 60,000 +
10,000 images; accepted as unverified copies), then the real `dvc repro` runs every stage.
The rows: the wall time, the epochs' share of it (the runs' own `time/epoch_seconds`, summed)
and the rest (fixed cost: processes, imports, data, logging), and each stage's wall time.
Then, on the same files, the course notebooks' own code for the four labs, a process each
(`bench_notebooks.py`; ~20 min more, NOTEBOOKS=0 skips it): the notebooks' total, whole
processes and epochs, beside the pipeline's.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path(os.environ.get("SOURCE", REPO)).resolve()
MNIST_ROWS = (60_000, 10_000)
NOTEBOOKS = os.environ.get("NOTEBOOKS", "1") != "0"  # NOTEBOOKS=0: the pipeline's side only


def make_downloads(folder: Path) -> None:
    """Random data in the real formats and sizes (see the module doc) in `folder`."""
    from bench import ASL_ROWS, write_kaggle_like_csv

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, rows in ASL_ROWS.items():
        write_kaggle_like_csv(folder / name, rows, rng)
    arrays = {}
    for split, rows in zip(("train", "test"), MNIST_ROWS, strict=True):
        arrays[f"x_{split}"] = rng.integers(0, 256, (rows, 28, 28), dtype=np.uint8)
        arrays[f"y_{split}"] = rng.integers(0, 10, rows, dtype=np.uint8)
    np.savez(folder / "mnist.npz", **arrays)


def make_workspace(workspace: Path) -> dict[str, str]:
    """Lay out the workspace from SOURCE; the environment its `dvc repro` runs in."""
    for folder in ("conf", "src"):
        shutil.copytree(SOURCE / folder, workspace / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(SOURCE / name, workspace / name)
    make_downloads(workspace / "downloads")
    env = dict(os.environ)
    for variable in ("DLILABS_ROOT", "MLFLOW_TRACKING_URI", "DLILABS_DOWNLOADS"):
        env.pop(variable, None)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(workspace / "src"),
        DLILABS_STORE_DIR=str(workspace),
        DLILABS_ACCEPT_UNVERIFIED="true",
    )
    for args in (["init", "--no-scm", "-q"], ["config", "core.analytics", "false"]):
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace, env=env, check=True)
    return env


def timed_repro(workspace: Path, env: dict[str, str]) -> tuple[float, list[tuple[str, float]]]:
    """Run `dvc repro`, its output to repro.log; (wall s, [(stage, its wall s)])."""
    starts: list[tuple[str, float]] = []
    log = workspace / "repro.log"
    start = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro"], cwd=workspace, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        for line in process.stdout:
            sink.write(line)
            if line.startswith("Running stage '"):
                starts.append((line.split("'")[1], time.perf_counter()))
                print(f"  {time.perf_counter() - start:6.0f} s  {line.strip()}", flush=True)
        process.wait()
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"dvc repro failed ({process.returncode}); see {log}")
    ends = [moment for _, moment in starts[1:]] + [start + wall]
    return wall, [(name, end - began) for (name, began), end in zip(starts, ends, strict=True)]


def epoch_seconds(store: Path) -> dict[str, tuple[int, float]]:
    """Run name -> (epochs, their summed `time/epoch_seconds`) for every run in the store."""
    with sqlite3.connect(store / "mlflow.db") as connection:
        rows = connection.execute(
            "select runs.name, count(*), sum(metrics.value) from metrics join runs "
            "on metrics.run_uuid = runs.run_uuid where metrics.key = 'time/epoch_seconds' "
            "group by runs.run_uuid"
        )
        return {name: (count, total) for name, count, total in rows}


def rows() -> list:
    from bench import Measure, Row
    from bench_notebooks import timed_notebooks

    with tempfile.TemporaryDirectory(prefix="dlilabs-bench-repro-") as folder:
        workspace = Path(folder) / "repro"
        env = make_workspace(workspace)
        load = os.getloadavg()[0]
        wall, stages = timed_repro(workspace, env)
        epochs = epoch_seconds(workspace)
        notebooks = timed_notebooks(workspace / "downloads", Path(folder)) if NOTEBOOKS else {}
    trained = sum(total for _, total in epochs.values())
    where = f"{SOURCE}; once, load average {load:.1f} at the start"
    out = [
        Row(
            "repro whole `dvc repro`, random data of the real sizes",
            [
                Measure("", wall, "s", digits=0),
                Measure("epochs", trained, "s", digits=0),
                Measure("share", trained / wall, "", digits=2),
                Measure("fixed (the rest)", wall - trained, "s", digits=0),
                Measure("share", (wall - trained) / wall, "", digits=2, note=where),
            ],
        )
    ]
    if notebooks:
        notebook_wall = sum(wall_s for wall_s, _ in notebooks.values())
        notebook_epochs = sum(epochs_s for _, epochs_s in notebooks.values())
        out.append(
            Row(
                "repro the notebooks' code for the same labs and files, a process per lab",
                [
                    Measure("", notebook_wall, "s", digits=0),
                    Measure("epochs", notebook_epochs, "s", digits=0),
                    Measure("-> pipeline / notebooks, whole", wall / notebook_wall, "", digits=2),
                    Measure("epochs", trained / notebook_epochs, "", digits=2),
                ],
            )
        )
    for name, (count, total) in sorted(epochs.items()):
        measures = [Measure(f"{count} epochs", total, "s")]
        if name in notebooks:
            process, notebook_epochs = notebooks[name]
            measures += [
                Measure("notebook's", notebook_epochs, "s"),
                Measure("ratio", total / notebook_epochs, "", digits=2),
                Measure("notebook's whole process", process, "s"),
            ]
        out.append(Row(f"repro epochs of {name}", measures))
    out.extend(Row(f"repro stage {name}", [Measure("", seconds, "s")]) for name, seconds in stages)
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    for row in rows():
        print(row, flush=True)
