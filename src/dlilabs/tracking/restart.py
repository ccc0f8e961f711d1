"""A lab run that survives being stopped: its epoch checkpoint and the MLflow run it continues.

A run's checkpoint folder is named after its lab and a digest of its resolved config
(`paths` left out: a cluster node and a workstation name the same run alike), under
`paths.checkpoint_dir`. When a train starts with the config of a run that was stopped (a
signal, SLURM's preemption, time limit or requeue, `scancel`, a killed node) it finds that
folder: if the checkpoint was made from the same data, training continues after its last
epoch, in the same MLflow run (tag `resume.count`: how often it was resumed). Checkpoints are
removed when the run finishes, and when it fails (an error a restart would only repeat); an
interrupted run keeps its own. Two runs with one config at once: the first takes the
folder's lock, the others train without a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dlilabs.core import checkpoint
from dlilabs.core.checkpoint import Plan
from dlilabs.tracking.slurm import stopped_from_outside

log = logging.getLogger("dlilabs.train")


def config_digest(cfg: DictConfig) -> str:
    """A short digest of what a run computes and where it logs: the lab, its model, trainer,
    augmentation and dataset settings, its search trial and experiment. Paths, the download
    source and the store's location are left out (a cluster node names the run as a
    workstation does)."""
    resolved = OmegaConf.to_container(cfg, resolve=False)
    dataset = {key: value for key, value in resolved.get("dataset", {}).items() if key != "source"}
    identity = {
        "lab": resolved.get("lab"),
        "model": resolved.get("model"),
        "trainer": resolved.get("trainer"),
        "augment": resolved.get("augment"),
        "dataset": dataset,
        "trial": resolved.get("sweep", {}).get("trial"),
        "experiment": resolved.get("tracking", {}).get("experiment_name"),
    }
    text = OmegaConf.to_yaml(OmegaConf.create(identity), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_folder(cfg: DictConfig) -> Path:
    """`<paths.checkpoint_dir>/<lab>-<config digest>`: where this config's run checkpoints."""
    return Path(cfg.paths.checkpoint_dir) / f"{cfg.lab}-{config_digest(cfg)}"


def finished_before_stop(cfg: DictConfig) -> dict | None:
    """The results of this config's run when its checkpoint outlived it: the run FINISHED and
    the stop came before the checkpoint was removed (a requeue in the job's last second).
    The job then has nothing to do: the checkpoint goes, the results are the run's. Else None."""
    if not cfg.trainer.get("checkpoint", False):
        return None
    folder = checkpoint_folder(cfg)
    resumed = checkpoint.load(folder)
    run_id = resumed.extra.get("run_id") if resumed else None
    if not run_id:
        return None
    import mlflow

    from dlilabs.tracking.store import connect

    connect(cfg.tracking)
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    if run.info.status != "FINISHED":
        return None
    checkpoint.remove(folder)
    log.info(
        "%s: run %s had FINISHED before it was stopped; nothing left to train", cfg.lab, run_id
    )
    return {"lab": cfg.lab, "run_id": run_id, "skipped": True, **run.data.metrics}


def _resumable_run(run_id: str | None) -> str | None:
    """`run_id` if that MLflow run exists and has not finished (it is the one to continue)."""
    if not run_id:
        return None
    import mlflow

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    if run.info.lifecycle_stage != "active" or run.info.status == "FINISHED":
        return None
    return run_id


@contextlib.contextmanager
def restartable(cfg: DictConfig, data: str) -> Iterator[tuple[Plan | None, str | None]]:
    """Yield (the checkpoint plan for `fitting.fit`, the MLflow run id to continue or None).

    `data` identifies the training data (the splits' digests): a checkpoint made from other
    data is dropped. The plan is None when `trainer.checkpoint` is off, or another process
    with the same config holds the folder. Set `plan.extra["run_id"]` once the run started.
    On leaving: the checkpoint is removed unless the block was interrupted (Ctrl-C, SIGTERM,
    a scheduler's signal: KeyboardInterrupt or SystemExit)."""
    if not cfg.trainer.get("checkpoint", False):
        yield None, None
        return
    from filelock import FileLock, Timeout

    folder = checkpoint_folder(cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("Another run of this config is training (%s is locked): no checkpoint", folder)
        yield None, None
        return
    try:
        resumed = checkpoint.load(folder)
        if resumed is not None and resumed.extra.get("data") != data:
            log.warning("The checkpoint in %s was made from other data: starting afresh", folder)
            checkpoint.remove(folder)
            resumed = None
        run_id = _resumable_run(resumed.extra.get("run_id")) if resumed else None
        plan = Plan(folder, resumed, extra={"data": data})
        try:
            yield plan, run_id
        except BaseException as error:
            if not stopped_from_outside(error):
                checkpoint.remove(folder)  # an error of its own: a restart would repeat it
            elif checkpoint.load(folder) is not None:
                log.warning(
                    "Stopped: the checkpoint in %s keeps the finished epochs; the same command "
                    "continues from there",
                    folder,
                )
            raise
        checkpoint.remove(folder)
    finally:
        lock.release()
        Path(lock.lock_file).unlink(missing_ok=True)


def resume_tags(plan: Plan | None, previous_count: str | None) -> dict[str, str]:
    """Tags of a run resumed from `plan`'s checkpoint: the epoch it continued after and how
    often it was resumed (`previous_count`: the run's `resume.count` so far)."""
    if plan is None or plan.resumed is None:
        return {}
    return {
        "resume.from_epoch": str(plan.resumed.epoch),
        "resume.count": str(int(previous_count or 0) + 1),
    }


def log_missing_epochs(run_id: str, rows: list[dict[str, float]]) -> None:
    """Log the checkpoint's history rows that the run lacks (a stop between the checkpoint
    and the metrics' upload), so its per-epoch metrics have every epoch exactly once."""
    import mlflow
    from mlflow.entities import Metric

    from dlilabs.core.fitting import metric_name

    client = mlflow.MlflowClient()
    logged = {metric.step for metric in client.get_metric_history(run_id, "train/loss")}
    missing = [
        Metric(metric_name(column), value, int(time.time() * 1000), int(row["epoch"]))
        for row in rows
        if int(row["epoch"]) not in logged
        for column, value in row.items()
        if column != "epoch"
    ]
    if missing:
        client.log_batch(run_id, metrics=missing)


def run_tag(run_id: str | None, name: str) -> str | None:
    """Tag `name` of the MLflow run `run_id` (None for no run or no such tag)."""
    if not run_id:
        return None
    import mlflow

    return mlflow.MlflowClient().get_run(run_id).data.tags.get(name)
