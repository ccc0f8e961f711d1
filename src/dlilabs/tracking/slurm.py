"""Sweeps on SLURM that never lose a job: `hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml).

Hydra's submitit launcher submits one array job per sweep and then reads the results in
order: the first job that ends without one (cancelled, out of time or memory, its node
gone) raises, and the sweep returns while the other jobs still run, unwatched. `launch`
here submits the same way, then waits for every job:

- A job's state comes from `scontrol show job` (no accounting needed), else `sacct`; one
  that neither knows any more and that left no result is lost, so nothing waits forever.
- A requeued job (preemption, `scontrol requeue`, a node that failed) is waited for: it
  comes back and continues its run from its epoch checkpoint (`dlilabs.tracking.restart`).
- Each job that ended without a result is one line: its combination, the cause (SLURM's
  state: CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, FAILED), its log. Its MLflow run, if
  it started one, ends KILLED (FAILED for an error) with the tag `slurm.end_cause`. The sweep
  then stops with an error naming them and the command that resumes the sweep; re-running
  it trains only the combinations without a FINISHED run (`dlilabs.tracking.resume`), each
  from its checkpoint where it has one.

Every run made inside a SLURM job carries `slurm_tags()`.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from dlilabs.ground.errors import UserError

log = logging.getLogger("dlilabs.slurm")

TAG_ENV = {
    "slurm.job_id": "SLURM_JOB_ID",
    "slurm.array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm.array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm.node": "SLURMD_NODENAME",
    "slurm.restart_count": "SLURM_RESTART_COUNT",
}
# SLURM states of a job that will not run again, and what they mean in words.
ENDED = {
    "COMPLETED": "ended without a result",
    "CANCELLED": "cancelled (scancel)",
    "TIMEOUT": "hit its time limit",
    "OUT_OF_MEMORY": "exceeded its memory limit",
    "NODE_FAIL": "its node failed",
    "FAILED": "failed",
    "BOOT_FAIL": "its node failed to boot",
    "DEADLINE": "missed its deadline",
    "PREEMPTED": "was preempted and not requeued",
}
POLL_S = 3.0
GRACE_S = 15.0  # an ended job's result file may take a moment to appear on a shared disk
UNKNOWN_S = 120.0  # a job neither scontrol nor sacct knows is given up after this


# Stop signals (SIGTERM, SIGUSR2, SIGINT) received during the current lab run
# (`labrun.lab_run` records them and clears the list when a run starts).
received: list[int] = []


def stopped_from_outside(error: BaseException) -> bool:
    """Whether `error` stops a training from outside (a signal, Ctrl-C, submitit's exit to be
    requeued, or its "not requeued: timed out" after the last allowed requeue), not a fault of
    its own: its run is KILLED and its checkpoint kept, for the same command to continue.

    Any error counts once a stop signal was received: the signal's KeyboardInterrupt, raised
    wherever the process was, may reach the caller as another error (a library that wraps
    what its callback raised), and the job is being stopped all the same."""
    return (
        bool(received)
        or isinstance(error, KeyboardInterrupt | SystemExit)
        or (type(error).__name__ == "UncompletedJobError" and "submitit" in type(error).__module__)
    )


def slurm_tags() -> dict[str, str]:
    """Where this process runs on SLURM: job and array ids, node, restart count, and the
    submitit log files ({} outside a SLURM job)."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    tags = {tag: os.environ.get(variable, "") for tag, variable in TAG_ENV.items()}
    tags["slurm.restart_count"] = tags["slurm.restart_count"] or "0"
    if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
        import submitit

        paths = submitit.JobEnvironment().paths
        tags["slurm.log"] = str(paths.stdout)
        tags["slurm.log_err"] = str(paths.stderr)
    return tags


def record_failed_start(cfg, error: str) -> None:
    """In a SLURM job, a job that cannot start (no GPU on a node that should have one) still
    leaves a FAILED run saying where it ran and why (tag `error`); outside SLURM, nothing."""
    tags = slurm_tags()
    if not tags:
        return
    import mlflow

    from dlilabs.tracking.store import connect
    from dlilabs.tracking.sweep import child_tags_and_name, job_overrides

    experiment_id = connect(cfg.tracking)
    sweep_tags, name = child_tags_and_name(cfg.get("run_name") or cfg.lab, job_overrides())
    client = mlflow.MlflowClient()
    tags = {**tags, **sweep_tags, "lab": str(cfg.lab), "error": error[:5000]}
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    client.set_terminated(run.info.run_id, "FAILED")


def array_tasks(spec: str) -> list[int]:
    """SLURM's array task list -> the task numbers: "3" -> [3], "2-4,7%2" -> [2, 3, 4, 7]."""
    numbers: list[int] = []
    for part in spec.split("%")[0].strip("[]").split(","):
        first, _, last = part.partition("-")
        if first.isdigit():
            numbers.extend(range(int(first), int(last or first) + 1))
    return numbers


def job_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: SLURM state} for the jobs SLURM still knows (`scontrol`, then `sacct` for the
    ones scontrol has forgotten); array tasks are named `<array id>_<index>`."""
    states: dict[str, str] = {}
    try:
        shown = subprocess.run(
            ["scontrol", "show", "job", "-o"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        shown = ""
    for line in shown.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        state = fields.get("JobState", "UNKNOWN")
        tasks = fields.get("ArrayTaskId", "N/A")
        if "ArrayJobId" in fields and tasks != "N/A":
            # Tasks still pending share one record: ArrayTaskId=2-5, 2,4-7 or 2-9%2.
            for task in array_tasks(tasks):
                states[f"{fields['ArrayJobId']}_{task}"] = state
        else:
            states[fields.get("JobId", "")] = state
    missing = [job_id for job_id in job_ids if job_id not in states]
    if missing:
        try:
            listed = subprocess.run(
                ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(missing)],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            listed = ""
        for line in listed.splitlines():
            job_id, _, state = line.partition("|")
            states.setdefault(job_id, state.split()[0] if state else "UNKNOWN")
    return states


# What slurmstepd writes into a job's error log when it ends a job (a cluster without cgroups
# reports a job killed over its memory as FAILED, signal 9; the log says why).
LOG_CAUSES = {
    "exceeded memory limit": "exceeded its memory limit",
    "DUE TO TIME LIMIT": "hit its time limit",
    "DUE TO NODE FAILURE": "its node failed",
}


def cause_of(job, state: str) -> str:
    """The reason a job with SLURM `state` ended, in words: from its error log when that
    says more than the state does, else from the state."""
    if state in ("FAILED", "UNKNOWN", "CANCELLED"):
        try:
            tail = job.paths.stderr.read_text(errors="replace")[-20_000:]
        except OSError:
            tail = ""
        for marker, cause in LOG_CAUSES.items():
            if marker in tail:
                return cause
    return ENDED.get(state, "left the queue without a result")


def wait_for_all(jobs: list) -> tuple[dict[int, object], dict[int, str]]:
    """Wait until every submitit job has a result or has ended without one.
    Returns ({index: result}, {index: cause in words})."""
    results: dict[int, object] = {}
    lost: dict[int, str] = {}
    ended_since: dict[int, float] = {}
    last_states: dict[int, str] = {}
    while len(results) + len(lost) < len(jobs):
        pending = [i for i in range(len(jobs)) if i not in results and i not in lost]
        states = job_states([jobs[i].job_id for i in pending])
        for index in pending:
            job = jobs[index]
            if job.paths.result_pickle.exists():
                try:
                    results[index] = job.results()[0]
                except Exception as error:  # submitit's error outcome: the job raised
                    lost[index] = "failed: " + str(error).strip().splitlines()[-1][:200]
                continue
            state = states.get(job.job_id, "UNKNOWN").split()[0]
            if state != last_states.get(index):
                log.info("job %s: %s", job.job_id, state)
                last_states[index] = state
            if state in ENDED or state == "UNKNOWN":
                first = ended_since.setdefault(index, time.monotonic())
                # Unknown to both scontrol and sacct for a while: gone (nothing waits forever).
                grace = GRACE_S if state in ENDED else UNKNOWN_S
                if time.monotonic() - first > grace:  # ended, and no result came
                    lost[index] = f"{cause_of(job, state)} ({state})"
            else:
                ended_since.pop(index, None)  # requeued or running again
        if len(results) + len(lost) < len(jobs):
            time.sleep(POLL_S)
    return results, lost


def end_lost_run(overrides: list[str], cause: str, state: str) -> str | None:
    """End the lost job's MLflow run (found under the sweep's parent by its job key), if it
    started one, KILLED (FAILED for a failure) with `slurm.end_cause`; return its id."""
    import mlflow

    from dlilabs.tracking import resume
    from dlilabs.tracking.sweep import PARENT_ENV

    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return None
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent).info.experiment_id
    key = resume.job_key(overrides).replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent}' and tags.`sweep.job_key` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    client.set_tag(run.info.run_id, "slurm.end_cause", cause)
    if run.info.status in ("RUNNING", "SCHEDULED"):
        client.set_terminated(run.info.run_id, "FAILED" if state == "FAILED" else "KILLED")
    return run.info.run_id


def varying(job_overrides, index: int) -> list[str]:
    """The overrides of job `index` that differ between the sweep's jobs (all of them for a
    one-job sweep): what names its combination."""
    from hydra.core.utils import filter_overrides

    values: dict[str, set[str]] = {}
    for overrides in job_overrides:
        for override in filter_overrides(list(overrides)):
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    own = filter_overrides(list(job_overrides[index]))
    if len(job_overrides) == 1:
        return own
    return [override for override in own if len(values[override.partition("=")[0]]) > 1]


def launch(launcher, job_overrides, initial_job_idx: int) -> list:
    """`hydra/launcher=slurm`'s launch: submit the jobs as Hydra's submitit launcher does,
    wait for all of them, and raise a UserError naming the lost ones (see module doc)."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus, filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    params = dict(launcher.params)
    executor = submitit.AutoExecutor(
        cluster=launcher._EXECUTOR,
        folder=params.pop("submitit_folder"),
        **{f"{launcher._EXECUTOR}_max_num_timeout": params.pop("max_num_timeout", 0)},
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{key if key in base else f"{launcher._EXECUTOR}_{key}": v for key, v in params.items()}
    )
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    arguments = [
        (
            list(overrides),
            "hydra.sweep.dir",
            initial_job_idx + i,
            f"job_id_for_{i}",
            Singleton.get_state(),
        )
        for i, overrides in enumerate(job_overrides)
    ]
    jobs = executor.map_array(launcher, *zip(*arguments, strict=True))
    for job, overrides in zip(jobs, job_overrides, strict=True):
        log.info(
            "SLURM job %s: %s", job.job_id, " ".join(filter_overrides(overrides)) or "(defaults)"
        )
    results, lost = wait_for_all(jobs)
    for index, result in list(results.items()):
        if result.status == JobStatus.FAILED:  # the task raised (Hydra kept the error)
            error = result._return_value
            lost[index] = f"failed: {type(error).__name__}: {str(error)[:300]} (FAILED)"
            del results[index]
    if not lost:
        return [results[i] for i in range(len(jobs))]
    lines = []
    for index, cause in sorted(lost.items()):
        overrides = list(job_overrides[index])
        state = cause.rsplit("(", 1)[-1].rstrip(")")
        run_id = end_lost_run(overrides, cause, state)
        combination = " ".join(varying(job_overrides, index)) or "(defaults)"
        where = f"run {run_id}" if run_id else "no run started"
        job = jobs[index]
        lines.append(f"  {combination}: job {job.job_id} {cause}; {where}; log {job.paths.stderr}")
    command = shlex.join([sys.executable.rsplit("/", 1)[-1], "-m", "dlilabs.train", *sys.argv[1:]])
    raise UserError(
        f"{len(lost)} of {len(jobs)} SLURM jobs ended without a result (the others finished):\n"
        + "\n".join(lines)
        + "\nresume them (finished ones are skipped, each continues from its checkpoint):\n  "
        + command
    )
