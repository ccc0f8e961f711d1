"""A run stopped mid-training by a signal continues from its last epoch checkpoint when the
same command runs again: same MLflow run, every epoch once, and (deterministic) exactly the
numbers of a run that was never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest

from conftest import stage_env, store_runs, write_prepared
from dlilabs.core import checkpoint
from dlilabs.ground.config import compose
from dlilabs.ground.io import write_json
from dlilabs.tracking.labrun import lab_run
from dlilabs.tracking.restart import checkpoint_folder, config_digest, restartable
from dlilabs.tracking.store import connect

pytestmark = pytest.mark.slow

OVERRIDES = [
    "experiment=mnist_mlp",
    "trainer.epochs=6",
    "trainer.deterministic=true",
    "model.hidden_units=[256,256]",
    "tracking.register_models=false",
    "tracking.system_metrics=false",
]


def train(project, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dlilabs.train", *OVERRIDES, *extra],
        cwd=project,
        env=stage_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_config_digest_ignores_paths_but_not_settings(project):
    base = compose(OVERRIDES)
    moved = compose([*OVERRIDES, "paths.root=/elsewhere"])
    other = compose([*OVERRIDES, "trainer.seed=1"])
    assert config_digest(base) == config_digest(moved)
    assert config_digest(base) != config_digest(other)
    assert checkpoint_folder(base).name.startswith("mnist_mlp-")


def stop_after(process: subprocess.Popen, folder, epoch: int, stop: signal.Signals) -> int:
    """Send `stop` to the training `process` once its checkpoint holds `epoch`; the epoch its
    checkpoint holds once it has stopped (it must stop with a failure)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = folder / "state.json"
        if state.is_file() and json.loads(state.read_text())["epoch"] >= epoch:
            break
        time.sleep(0.05)
    process.send_signal(stop)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0, output
    assert (folder / "state.json").is_file(), f"the stopped run left no checkpoint:\n{output}"
    return json.loads((folder / "state.json").read_text())["epoch"]


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler for the test, as in a terminal: a shell's background job
    (CI's, say) starts with SIGINT ignored, and then Ctrl-C stops nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR2, signal.SIGINT])
def test_a_stop_signal_that_comes_back_as_another_error_keeps_the_checkpoint(
    project, stop, ctrl_c_raises
):
    # The signal's KeyboardInterrupt is raised wherever the process is; a library around that
    # place (TensorFlow calling back into Python, say) may turn it into an error of its own.
    # The job is still being stopped: its checkpoint stays, its run ends KILLED, it exits as
    # for the signal.
    cfg = compose(OVERRIDES)
    connect(cfg.tracking)
    folder = checkpoint_folder(cfg)
    handler = signal.getsignal(stop)
    with (
        pytest.raises(KeyboardInterrupt, match="received signal"),
        restartable(cfg, "data") as (plan, _),
        lab_run("stopped") as run,
    ):
        state = {"epoch": 2, "rows": [], "variables": "variables-2.npz", "extra": plan.extra}
        write_json(folder / "state.json", state)
        try:
            os.kill(os.getpid(), stop)
            time.sleep(10)  # the handler raises here
        except KeyboardInterrupt as interrupt:
            raise RuntimeError("a library's error around its callback") from interrupt
    assert checkpoint.load(folder).epoch == 2
    assert mlflow.get_run(run.info.run_id).info.status == "KILLED"
    assert signal.getsignal(stop) == handler  # the run's handler is gone with it


def test_a_run_stopped_twice_resumes_in_the_same_run_with_the_uninterrupted_numbers(project):
    write_prepared(project / "data" / "prepared" / "mnist", 6000, 300, 10)
    whole = train(project)
    output = whole.communicate(timeout=600)[0]
    assert whole.returncode == 0, output
    (uninterrupted,) = store_runs(project)

    folder = checkpoint_folder(compose(OVERRIDES))
    assert not folder.exists()  # removed once the run finished
    # SLURM's warning before a preemption or the time limit (--signal=USR2@...), then the
    # SIGTERM of `scancel`, of a preemption or of Ctrl-C's kin: each leaves a checkpoint.
    stopped = train(project, "sweep.resume=false")  # sweep.resume: not part of the identity
    first = stop_after(stopped, folder, 2, signal.SIGUSR2)
    interrupted = next(r for r in store_runs(project) if r.info.run_id != uninterrupted.info.run_id)
    assert interrupted.info.status == "KILLED"
    assert 2 <= first < 5

    again = train(project)
    second = stop_after(again, folder, first + 1, signal.SIGTERM)
    assert first < second < 6
    assert mlflow.get_run(interrupted.info.run_id).info.status == "KILLED"

    resumed = train(project)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert f"Continuing MLflow run {interrupted.info.run_id} after epoch {second}" in output
    assert len(store_runs(project)) == 2  # the stopped run was continued, not started anew
    run = mlflow.get_run(interrupted.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resume.count"] == "2"
    assert run.data.tags["resume.from_epoch"] == str(second)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/accuracy")
    assert sorted(metric.step for metric in history) == [1, 2, 3, 4, 5, 6]  # each epoch once
    for name, value in uninterrupted.data.metrics.items():
        if name.startswith(("train/", "val/", "gap/", "best", "final/")):
            assert run.data.metrics[name] == value, name
    assert not folder.exists()
