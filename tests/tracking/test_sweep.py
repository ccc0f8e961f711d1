"""Hydra multirun sweeps as grouped MLflow runs, with the real launchers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import stage_env, write_prepared
from dlilabs.ground.config import compose
from dlilabs.tracking.resume import job_key, sweep_key
from dlilabs.tracking.sweep import best_child, sweep_keys

TINY = ["experiment=mnist_mlp", "trainer.epochs=2"]


def sweep(project, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m dlilabs.train -m ...` against `project` and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "dlilabs.train", "-m", *overrides],
        env=stage_env(project),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sweep_runs(project, experiment="dlilabs"):
    """(parent runs, child runs) in the project's store."""
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    parents = [run for run in runs if run.data.tags.get("sweep") == "parent"]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    return parents, children


def test_sweep_keys_are_the_overrides_with_several_values():
    overrides = ["experiment=asl_cnn", "model.dropout=0.1,0.3", "augment=none,dli", "x=range(1,3)"]
    assert sweep_keys(overrides) == ["model.dropout", "augment", "x"]


def test_best_child_respects_the_goal_and_skips_unfinished_and_pruned_runs():
    class Run:  # the attributes best_child reads
        def __init__(self, value, status="FINISHED", tags=None):
            self.data = type("Data", (), {"metrics": {"m": value}, "tags": tags or {}})()
            self.info = type("Info", (), {"status": status})()

    runs = [Run(0.2), Run(0.9), Run(0.5), Run(0.99, "FAILED"), Run(1.0, tags={"pruned": "true"})]
    assert best_child(runs, "m", "max") is runs[1]
    assert best_child(runs, "m", "min") is runs[0]
    assert best_child(runs, "other", "max") is None


def test_a_job_is_known_by_its_overrides_in_any_order():
    one = ["experiment=mnist_mlp", "trainer.seed=1", "augment=dli"]
    assert job_key(one) == job_key([*reversed(one), "sweep.resume=true"])
    assert job_key(one) != job_key(["experiment=mnist_mlp", "trainer.seed=2", "augment=dli"])
    assert sweep_key("mnist_mlp", one) == sweep_key("mnist_mlp", list(reversed(one)))
    assert sweep_key("mnist_mlp", one) != sweep_key("asl_mlp", one)


@pytest.mark.slow
def test_parallel_sweep_groups_jobs_under_one_parent(project, tiny_mnist):
    """Two jobs at once on the default SQLite store: every run recorded and finished."""
    result = sweep(
        project, *TINY, "model.hidden_units=[8],[32]", "augment=none,dli", "hydra/launcher=parallel"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "database is locked" not in result.stdout + result.stderr
    (parent,), children = sweep_runs(project)
    assert len(children) == 4, result.stdout[-3000:]
    assert {run.info.status for run in [parent, *children]} == {"FINISHED"}
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    # Child names say what varies, and only that.
    assert sorted(run.info.run_name for run in children) == [
        "mnist_mlp model.hidden_units=[32] augment=dli",
        "mnist_mlp model.hidden_units=[32] augment=none",
        "mnist_mlp model.hidden_units=[8] augment=dli",
        "mnist_mlp model.hidden_units=[8] augment=none",
    ]
    best = max(children, key=lambda run: run.data.metrics["best/val/accuracy"])
    assert parent.data.tags["best_child.run_id"] == best.info.run_id
    for name in ("best/val/accuracy", "final/gap/accuracy", "best_epoch/gap/accuracy"):
        assert parent.data.metrics[f"best_child/{name}"] == pytest.approx(best.data.metrics[name])
    assert parent.data.params["override.augment"] == "none,dli"
    assert "TensorFlow threads: 1 per job" in result.stdout + result.stderr
    # Jobs keep their models apart, in their own sweep folders, not in models/<lab>.
    assert not (project / "models" / "mnist_mlp").exists()
    assert len(list((project / "logs" / "multiruns").glob("*/*/*/model.keras"))) == 4


@pytest.mark.slow
def test_line_fit_optimizer_sweep_measures_the_distance_to_least_squares(project):
    result = sweep(
        project, "experiment=line_fit", "trainer.optimizer=sgd,rmsprop,adam", "trainer.epochs=100"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (parent,), children = sweep_runs(project)
    assert sorted(run.info.run_name for run in children) == [
        "line_fit trainer.optimizer=adam",
        "line_fit trainer.optimizer=rmsprop",
        "line_fit trainer.optimizer=sgd",
    ]
    for run in children:
        floor = run.data.metrics["floor/mse"]
        assert floor == pytest.approx(14.879, abs=1e-3)
        assert run.data.metrics["gap/mse"] == pytest.approx(run.data.metrics["fit/mse"] - floor)
        assert run.data.metrics["gap/mse"] >= -1e-6  # nothing beats least squares
    closest = min(children, key=lambda run: run.data.metrics["fit/mse"])
    assert parent.data.tags["best_child.run_id"] == closest.info.run_id


@pytest.mark.slow
def test_a_failing_job_fails_the_parent_not_leaves_it_running(project, tiny_mnist):
    result = sweep(
        project, *TINY, "model.hidden_units=[16]", "trainer.optimizer=sgd,notanoptimizer"
    )
    assert result.returncode != 0
    assert "notanoptimizer" in result.stderr and "Traceback" not in result.stderr
    (parent,), children = sweep_runs(project)
    assert parent.info.status == "FAILED"
    assert [run.info.status for run in children] == ["FINISHED"]


@pytest.mark.slow
def test_submitit_local_processes_carry_the_parent_run(project, tiny_mnist):
    """The SLURM launcher's local executor: jobs in separate processes still join the sweep."""
    result = sweep(
        project,
        *TINY,
        "model.hidden_units=[16]",
        "trainer.seed=1,2",
        "hydra/launcher=local_processes",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (parent,), children = sweep_runs(project)
    assert len(children) == 2 and parent.info.status == "FINISHED"
    assert {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}


def test_slurm_launcher_requests_one_gpu_per_job():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dlilabs.ground.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = hydra_compose(
            "config", ["hydra/launcher=slurm", "experiment=asl_cnn"], return_hydra_config=True
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    # The composed job asks for what conf/hydra/launcher/slurm.yaml says, not submitit's defaults.
    written = yaml.safe_load((Path(config_dir()) / "hydra/launcher/slurm.yaml").read_text())
    for key in ("cpus_per_task", "mem_gb", "timeout_min", "array_parallelism"):
        assert launcher[key] == written[key], key
    assert compose(["experiment=asl_cnn"]).trainer.device == "gpu"


@pytest.mark.slow
def test_a_stopped_sweep_rerun_runs_only_what_it_had_not_finished(project, tiny_mnist):
    """The third job fails (its dataset is not prepared), which stops the sweep; once the
    data is there, the same sweep reopens the same parent and trains only the two missing."""
    grid = [*TINY, "model.hidden_units=[16]", "dataset=mnist,mnist_demo", "trainer.seed=1,2"]
    stopped = sweep(project, *grid)
    assert stopped.returncode != 0 and "mnist_demo/train.npz does not exist" in stopped.stderr
    (parent,), children = sweep_runs(project)
    assert parent.info.status == "FAILED" and len(children) == 2

    write_prepared(project / "data" / "prepared" / "mnist_demo", 320, 80, 10)
    resumed = sweep(project, *grid)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "skipping 2 of 4 combinations already FINISHED, running the other 2" in output
    (again,), children = sweep_runs(project)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["sweep.skipped"] == "2" and again.data.tags["sweep.resumed"] == "1"
    # Four combinations, each trained once: the first two were not trained again.
    assert len(children) == 4 and {run.info.status for run in children} == {"FINISHED"}
    assert len({run.data.tags["sweep.job_key"] for run in children}) == 4
    assert sorted(run.data.tags["dataset"] for run in children) == [
        "mnist",
        "mnist",
        "mnist_demo",
        "mnist_demo",
    ]
    assert again.data.metrics["children"] == 4
