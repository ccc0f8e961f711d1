"""Sweeps that resume: re-running a stopped sweep runs only what it has not finished.

A sweep is identified by its lab and its overrides (`sweep.key` on the parent run, a hash of
both); each job by its own overrides, sorted (`sweep.job_key` on the child run). When a sweep
starts and the latest parent with its key ended FAILED or KILLED (a job failed, Ctrl-C, or
reconcile found its process gone), that parent is reopened instead of creating a new one, and
the jobs whose key already has a FINISHED child under it return that child's results
without training (`finished_in_sweep`). A parent that FINISHED, or one still RUNNING
elsewhere, is left alone: the sweep starts afresh. `sweep.resume=false` always does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from omegaconf import DictConfig

log = logging.getLogger("dlilabs.sweep")

DONE_ENV = "DLILABS_SWEEP_DONE"  # JSON {job key: run id}: what the resumed sweep skips
RESUMABLE = ("FAILED", "KILLED")
IGNORED = ("sweep.resume",)  # overrides that do not change what a sweep computes


def job_key(overrides: list[str]) -> str:
    """A job's identity within its sweep: its overrides, sorted (`sweep.resume` left out)."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in IGNORED]
    return " ".join(sorted(kept))


def sweep_key(lab: str, overrides: list[str]) -> str:
    """A sweep's identity: a short hash of its lab and its overrides, in any order."""
    return hashlib.sha256(f"{lab}|{job_key(overrides)}".encode()).hexdigest()[:16]


def grid_keys(config: DictConfig) -> list[str] | None:
    """The job keys Hydra's basic sweeper will run for this multirun config (its params,
    then the command line's overrides), or None for another sweeper (a search's trials are
    new every time)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    params = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    # Hydra has no public API for "the jobs the basic sweeper runs": split_arguments is that
    # sweeper's own static method (hydra._internal), kept so the keys match what it launches;
    # hydra-core is pinned <1.4 and tests/tracking/test_sweep.py resumes a real grid sweep.
    batches = BasicSweeper.split_arguments(parsed, None)
    return [job_key(job) for batch in batches for job in batch]


def previous_parent(client, experiment_id: str, key: str):
    """The latest parent run with sweep key `key`, when it can be resumed (FAILED, KILLED)."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.sweep = 'parent' and tags.`sweep.key` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs and runs[0].info.status in RESUMABLE else None


def finished_children(client, experiment_id: str, parent_id: str) -> dict[str, str]:
    """{job key: run id} of the parent's FINISHED children (the latest per key)."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    keyed = [run for run in runs if "sweep.job_key" in run.data.tags]
    return {run.data.tags["sweep.job_key"]: run.info.run_id for run in keyed}


def reopen(client, parent, config: DictConfig) -> None:
    """Make `parent` this sweep's parent again: RUNNING, owned by this process, and tell
    the jobs (through DONE_ENV) which combinations are done."""
    from dlilabs.tracking.reconcile import owner_tags

    parent_id = parent.info.run_id
    done = finished_children(client, parent.info.experiment_id, parent_id)
    expected = grid_keys(config)
    # A search's trials are new every time (its study continues): nothing to skip.
    done = {key: run_id for key, run_id in done.items() if key in (expected or ())}
    client.update_run(parent_id, status="RUNNING")
    resumed = int(parent.data.tags.get("sweep.resumed", "0")) + 1
    tags = {**owner_tags(), "sweep.skipped": str(len(done)), "sweep.resumed": str(resumed)}
    for key, value in tags.items():
        client.set_tag(parent_id, key, value)
    os.environ[DONE_ENV] = json.dumps(done)
    if expected is None:
        log.info("Resuming sweep %s (ended %s)", parent_id, parent.info.status)
        return
    log.info(
        "Resuming sweep %s (ended %s): skipping %d of %d combinations already FINISHED, "
        "running the other %d (sweep.resume=false starts afresh)",
        parent_id,
        parent.info.status,
        len(done),
        len(expected),
        len(expected) - len(done),
    )


def finished_in_sweep(cfg: DictConfig, overrides: list[str]) -> dict | None:
    """In a resumed sweep, the results of the FINISHED child of the job with `overrides`
    ({lab, run_id, skipped: True, metrics...}) when it has one: the job then has nothing to
    do. None otherwise."""
    done = json.loads(os.environ.get(DONE_ENV) or "{}")
    if not done:
        return None
    run_id = done.get(job_key(overrides))
    if run_id is None:
        return None
    import mlflow

    from dlilabs.tracking.store import connect

    connect(cfg.tracking)
    run = mlflow.MlflowClient().get_run(run_id)
    log.info("%s: already FINISHED in this sweep (run %s), skipped", run.info.run_name, run_id)
    return {"lab": cfg.lab, "run_id": run_id, "skipped": True, **run.data.metrics}
