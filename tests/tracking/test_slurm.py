"""Sweeps on a real SLURM cluster (`make cluster`: one node with accounting, started by CI):
every job is waited for, a cancelled job is named with the command that resumes it, a
requeued job continues its own run from its checkpoint, and every run says where it ran."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import mlflow
import pytest

from conftest import stage_env, store_runs, write_prepared

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return states.returncode == 0 and any(
        state.startswith(("idle", "mixed", "allocated")) for state in states.stdout.split()
    )


@pytest.fixture(autouse=True)
def _cluster():
    if not cluster_up():
        pytest.skip("no SLURM cluster here: `make cluster` (as root) starts a one-node one")


CPU_JOBS = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=3",
    "hydra.launcher.timeout_min=20",
    "tracking.register_models=false",
    "tracking.system_metrics=false",
    "trainer.threads=1",
]


def train(project, *arguments: str, multirun: bool = False) -> subprocess.Popen:
    """`python -m dlilabs.train [-m] <arguments>` (lab 1, CPU jobs on the cluster) in `project`.
    `-m` goes first: argparse takes no override after it once overrides came before."""
    flags = ["-m"] if multirun else []
    command = ["-m", "dlilabs.train", *flags, "experiment=mnist_mlp", *CPU_JOBS, *arguments]
    return subprocess.Popen(
        [sys.executable, *command],
        cwd=project,
        env=stage_env(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def sweep(project, *overrides: str) -> subprocess.Popen:
    return train(project, *overrides, multirun=True)


def test_a_grid_sweep_runs_every_job_on_slurm_and_says_where(project):
    write_prepared(project / "data" / "prepared" / "mnist", 400, 100, 10)
    # Three jobs on two CPUs: the third waits in the queue (a pending array task) meanwhile.
    process = sweep(project, "trainer.epochs=2", "model.hidden_units=[16],[32],[48]")
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out + err
    found = store_runs(project)
    parents = [run for run in found if run.data.tags.get("sweep") == "parent"]
    children = [run for run in found if run.data.tags.get("sweep") == "child"]
    assert [parent.info.status for parent in parents] == ["FINISHED"]
    assert sorted(run.info.status for run in children) == ["FINISHED"] * 3
    assert {run.data.params["model.hidden_units"] for run in children} == {"[16]", "[32]", "[48]"}
    array_ids = {run.data.tags["slurm.array_job_id"] for run in children}
    assert len(array_ids) == 1  # one array job for the sweep
    assert sorted(run.data.tags["slurm.array_task_id"] for run in children) == ["0", "1", "2"]
    for run in children:
        tags = run.data.tags
        assert tags["slurm.job_id"].isdigit()
        assert tags["slurm.node"] == subprocess.check_output(["hostname", "-s"], text=True).strip()
        assert tags["slurm.restart_count"] == "0"
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        log_file = project.joinpath(tags["slurm.log"])
        assert log_file.is_file() and log_file.name.startswith(tags["slurm.array_job_id"] + "_")


def checkpoints(project) -> dict[str, dict]:
    """{run id: checkpoint state} of the runs training now."""
    found = {}
    for state in (project / "checkpoints").glob("*/state.json"):
        try:
            content = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        found[content["extra"].get("run_id")] = content
    return found


def job_of(run_id: str) -> str:
    """The run's SLURM array task as `<array job>_<task>` (the array's own id would name the
    whole array to scancel and scontrol)."""
    tags = mlflow.get_run(run_id).data.tags
    return f"{tags['slurm.array_job_id']}_{tags['slurm.array_task_id']}"


def wait_for(condition, timeout=300, what="a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_cancelled_and_requeued_jobs_never_lose_the_sweep(project):
    write_prepared(project / "data" / "prepared" / "mnist", 8000, 200, 10)
    command = ["trainer.epochs=30", "model.hidden_units=[128],[256]"]
    process = sweep(project, *command)
    # Only the store's address: the sweep creates the store (under its lock) before any job.
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")

    # Both jobs run at once (2 cores, 1 CPU each). Each is stopped once it has checkpointed
    # two epochs: one cancelled, the other preempted.
    def at_epoch_two(units: str):
        def found():
            for run_id, state in checkpoints(project).items():
                params = mlflow.get_run(run_id).data.params
                if params["model.hidden_units"] == units and state["epoch"] >= 2:
                    return run_id
            return None

        return wait_for(found, what=f"the {units} job's epoch 2")

    cancelled = at_epoch_two("[128]")
    subprocess.run(["scancel", job_of(cancelled)], check=True)
    requeued = at_epoch_two("[256]")
    # Submitit's preemption signal: the job saves its submission and requeues itself
    # (`scontrol requeue`), as SLURM's preemption or time-limit warning would make it do.
    subprocess.run(["scancel", "--signal=USR2", job_of(requeued)], check=True)
    # The test cluster holds a requeued job back 10 s (AuthInfo=cred_expire; 120 s by default).
    out, err = process.communicate(timeout=600)
    assert process.returncode != 0, out + err
    # One line names the lost combination, its cause and its run; then the command to resume.
    lost = [line for line in err.splitlines() if line.startswith("  model.hidden_units=")]
    assert len(lost) == 1, err
    assert lost[0].startswith("  model.hidden_units=[128]: job ")
    assert "cancelled (scancel)" in lost[0] and cancelled in lost[0], err
    assert "resume them" in err and "dlilabs.train -m experiment=mnist_mlp" in err

    found = {run.info.run_id: run for run in store_runs(project)}
    parent = next(run for run in found.values() if run.data.tags.get("sweep") == "parent")
    assert parent.info.status == "FAILED"
    assert found[cancelled].info.status == "KILLED"
    assert "CANCELLED" in found[cancelled].data.tags["slurm.end_cause"]
    # The requeued job came back and continued its own run: one run, every epoch once.
    survivor = found[requeued]
    assert survivor.info.status == "FINISHED", err
    assert survivor.data.tags["slurm.restart_count"] == "1"
    assert survivor.data.tags["resume.count"] == "1"
    steps = mlflow.MlflowClient().get_metric_history(requeued, "val/accuracy")
    assert sorted(metric.step for metric in steps) == list(range(1, 31))
    assert len(found) == 3  # parent + one child per combination

    # Re-running the sweep trains only the lost combination, continuing its own run; its node
    # goes DOWN meanwhile (NODE_FAIL): SLURM requeues the job, which continues once the node
    # is back.
    # The first sweep's jobs leave the queue first: a job's process can outlive the result
    # it handed back (its exit), and the node failure below is meant for the re-run's job.
    def queue_empty() -> bool:
        return not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip()

    wait_for(queue_empty, timeout=120, what="the first sweep's jobs to leave the queue")
    # The cancel took a moment to land: the node fails once the re-run has trained past it.
    stopped_at = checkpoints(project)[cancelled]["epoch"]
    again = sweep(project, *command)
    node = subprocess.check_output(["hostname", "-s"], text=True).strip()

    def resumed_a_few_epochs():
        state = checkpoints(project).get(cancelled)
        return state and state["epoch"] >= stopped_at + 2

    wait_for(resumed_a_few_epochs, what=f"the resumed job's epoch {stopped_at + 2}")
    down = ["scontrol", "update", f"nodename={node}"]
    subprocess.run([*down, "state=down", "reason=dlilabs-test"], check=True)
    time.sleep(3)
    subprocess.run([*down, "state=resume"])  # refused if slurmd already brought it back
    wait_for(cluster_up, timeout=120, what="the node to be back")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, out + err
    found = {run.info.run_id: run for run in store_runs(project)}
    assert len(found) == 3
    assert found[parent.info.run_id].info.status == "FINISHED"
    assert found[cancelled].info.status == "FINISHED"
    assert found[cancelled].data.tags["resume.count"] == "2"  # the re-run, the node's return
    assert found[cancelled].data.tags["slurm.restart_count"] == "1"
    steps = mlflow.MlflowClient().get_metric_history(cancelled, "val/accuracy")
    assert sorted(metric.step for metric in steps) == list(range(1, 31))
    assert not list((project / "checkpoints").glob("*/state.json"))  # removed once finished


def test_dvc_repro_runs_the_train_stage_as_a_slurm_job_and_evaluate_here(tmp_path):
    from conftest import REPO
    from dlilabs.demo import make_workspace

    workspace = make_workspace(REPO, tmp_path / "repo", epochs=1, git=True, story=False)
    params = workspace / "params.yaml"
    launcher = "srun --cpus-per-task=1 --mem=3G --time=10"
    params.write_text(params.read_text().replace("launcher: ''", f"launcher: {launcher}"))
    assert launcher in params.read_text()
    stages = ["train@mnist_mlp", "evaluate@mnist_mlp"]
    first = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", *stages],
        cwd=workspace,
        env=stage_env(workspace, DLILABS_STORE_DIR=str(workspace)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    # A second `dvc repro` of the same checkout while the first waits for its SLURM job:
    # DVC's stage lock (.dvc/tmp/rwlock) refuses it in so many words; the first goes on.
    # Its job is the one working in this workspace (%Z): an earlier test's job still leaving
    # the queue must not start the second one before the first holds the lock.
    def train_job_queued() -> bool:
        queued = subprocess.run(["squeue", "-h", "-o", "%Z"], capture_output=True, text=True)
        return str(workspace.resolve()) in map(os.path.realpath, queued.stdout.split())

    wait_for(train_job_queued, timeout=600, what="the train stage's SLURM job")
    second = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", *stages],
        cwd=workspace,
        env=stage_env(workspace, DLILABS_STORE_DIR=str(workspace)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode != 0
    refusal = second.stdout + second.stderr
    assert "ERROR: failed to reproduce" in refusal and ".dvc/tmp/rwlock" in refusal, refusal
    out = first.communicate(timeout=900)[0]
    assert first.returncode == 0, out
    client = mlflow.MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    experiment = client.get_experiment_by_name("dlilabs-demo")
    (run,) = client.search_runs([experiment.experiment_id], "tags.lab = 'mnist_mlp'")
    job = run.data.tags["slurm.job_id"]  # the train stage ran inside a SLURM job
    assert run.data.tags["dvc.stage"] == "train@mnist_mlp"
    assert "eval/val_accuracy" in run.data.metrics  # evaluate ran after it, here
    accounted = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-j", job, "-o", "State"], capture_output=True, text=True
    )
    assert accounted.stdout.split() == ["COMPLETED"]
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", *stages],
        cwd=workspace,
        env=stage_env(workspace, DLILABS_STORE_DIR=str(workspace)),
        capture_output=True,
        text=True,
    )
    assert "up to date" in status.stdout, status.stdout


def test_a_job_that_requires_a_gpu_on_a_cpu_node_fails_at_once_with_a_failed_run(project):
    write_prepared(project / "data" / "prepared" / "mnist", 400, 100, 10)
    started = time.monotonic()
    process = sweep(project, "trainer.require_gpu=true", "trainer.epochs=1,2")
    out, err = process.communicate(timeout=600)
    assert process.returncode != 0
    assert time.monotonic() - started < 180  # seconds per job, not a training's time
    lost = [line for line in err.splitlines() if line.startswith("  trainer.epochs=")]
    assert len(lost) == 2 and all(" failed" in line for line in lost), err
    children = [run for run in store_runs(project) if run.data.tags.get("sweep") == "child"]
    assert sorted(run.info.status for run in children) == ["FAILED", "FAILED"]
    for run in children:
        assert "GPU" in run.data.tags["error"] and run.data.tags["slurm.node"]
        assert run.data.tags["slurm.end_cause"]


def test_a_job_over_its_memory_limit_is_named_with_its_cause(project):
    # 300 MB is less than TensorFlow needs to start: SLURM kills the job (OverMemoryKill;
    # without cgroups its state is FAILED, and slurmstepd's line in its log says why).
    write_prepared(project / "data" / "prepared" / "mnist", 400, 100, 10)
    limit = ["hydra.launcher.mem_gb=null", "hydra.launcher.mem_per_cpu=300M"]
    process = sweep(project, "trainer.epochs=1", *limit)
    out, err = process.communicate(timeout=600)
    assert process.returncode != 0, out + err
    (line,) = [line for line in err.splitlines() if line.startswith("  experiment=mnist_mlp")]
    assert "exceeded its memory limit" in line and "no run started" in line, err


def test_an_optuna_search_runs_its_trials_as_slurm_jobs(project):
    write_prepared(project / "data" / "prepared" / "mnist", 400, 100, 10)
    search = ["hparams_search=mnist_mlp_optuna", "hydra.sweeper.n_trials=2"]
    process = train(project, *search, "hydra.sweeper.n_jobs=2", "trainer.epochs=2")
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, out + err
    found = store_runs(project)
    parents = [run for run in found if run.data.tags.get("sweep") == "parent"]
    trials = [run for run in found if run.data.tags.get("sweep") == "child"]
    assert [parent.info.status for parent in parents] == ["FINISHED"]
    assert sorted(run.data.tags["search.trial"] for run in trials) == ["0", "1"]
    assert all(run.info.status == "FINISHED" for run in trials)
    assert len({run.data.tags["slurm.job_id"] for run in trials}) == 2  # one job per trial
    assert all("search/objective" in run.data.metrics for run in trials)
