"""Hydra multirun as grouped MLflow runs: one parent run per sweep, every job a child.

`MlflowSweepCallback` (wired in conf/config.yaml under hydra.callbacks) creates the parent
run when a train sweep starts and hands its id to the jobs through an environment variable,
which every launcher passes on (in-process, joblib workers, submitit/SLURM jobs). Each job's
run then carries `mlflow.parentRunId` and a name saying what varies. When the sweep ends the
parent gets the sweep's overrides, the best child by `sweep.metric`, and a summary table.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from dlilabs.tracking import resume

log = logging.getLogger("dlilabs.sweep")

PARENT_ENV = "DLILABS_PARENT_RUN_ID"
VARYING_ENV = "DLILABS_SWEEP_KEYS"
RANK_ENV = "DLILABS_SWEEP_RANK"  # "metric,goal", to summarise a sweep that ended in error
STUDY_ENV = "DLILABS_SEARCH_STUDY"  # an Optuna search's study name (dlilabs.tracking.search)


def job_overrides() -> list[str]:
    """The running Hydra job's command-line overrides ([] outside a Hydra app, e.g. tests)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def in_sweep() -> bool:
    """True inside a job of a `python -m dlilabs.train -m` sweep."""
    return bool(os.environ.get(PARENT_ENV))


def job_output_dir(default: str) -> Path:
    """Where a job writes its model: `default` (models/<lab>, DVC's outputs) for a single run,
    the job's own Hydra folder in a sweep, so jobs never overwrite one another's model."""
    if not in_sweep():
        return Path(default)
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(default)


def finished_in_sweep(cfg: DictConfig) -> dict | None:
    """In a resumed sweep, this job's FINISHED child's results (it then skips); else None."""
    return resume.finished_in_sweep(cfg, job_overrides())


def sweep_keys(overrides: list[str]) -> list[str]:
    """The keys a sweep varies: `["model.dropout=0.1,0.3", "lab=x"]` -> `["model.dropout"]`."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [override.get_key_element() for override in parsed if override.is_sweep_override()]


def child_tags_and_name(lab: str, job_overrides: list[str]) -> tuple[dict[str, str], str]:
    """Tags and run name for a job of the current sweep (nothing outside a sweep):
    ({"mlflow.parentRunId": ..., "sweep.job_key": ...}, "asl_cnn model.dropout=0.1 augment=dli");
    a search trial is also tagged with its study and number: "asl_cnn trial 3 model.dropout=...".
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return {}, lab
    varying = set(filter(None, os.environ.get(VARYING_ENV, "").split(",")))
    chosen = [o for o in job_overrides if o.split("=", 1)[0].lstrip("+~") in varying]
    tags = {"mlflow.parentRunId": parent, "sweep": "child"}
    tags["sweep.job_key"] = resume.job_key(job_overrides)  # a resumed sweep skips it if done
    trial = [o.split("=", 1)[1] for o in job_overrides if o.startswith("sweep.trial=")]
    if trial:
        tags.update({"search.trial": trial[0], "search.study": os.environ.get(STUDY_ENV, "")})
        return tags, " ".join([lab, f"trial {trial[0]}", *chosen])
    return tags, " ".join([lab, *chosen])


def best_child(children: list, metric: str, goal: str):
    """The FINISHED child run with the best `metric` (goal "max" or "min"), or None if none
    has it. A pruned trial (a partial run) is never the best."""
    scored = [
        run
        for run in children
        if metric in run.data.metrics
        and run.info.status == "FINISHED"
        and run.data.tags.get("pruned") != "true"
    ]
    if not scored:
        return None
    pick = max if goal == "max" else min
    return pick(scored, key=lambda run: run.data.metrics[metric])


def summary_table(children: list, metric: str) -> str:
    """Markdown table of the children: name, status, the sweep metric and the final gap."""
    lines = [f"| run | status | {metric} | final/gap/accuracy |", "|---|---|---|---|"]
    for run in sorted(children, key=lambda r: r.info.run_name or ""):
        value = run.data.metrics.get(metric, float("nan"))
        gap = run.data.metrics.get("final/gap/accuracy", float("nan"))
        status = run.info.status
        if run.data.tags.get("pruned") == "true":
            status += f" (pruned after epoch {run.data.tags.get('pruned_at_epoch', '?')})"
        lines.append(f"| {run.info.run_name} | {status} | {value:.4f} | {gap:.4f} |")
    return "\n".join(lines) + "\n"


class MlflowSweepCallback(Callback):
    """Creates, summarises and ends the parent run of a `python -m dlilabs.train -m` sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.job.name != "train":
            return
        import mlflow

        from dlilabs.tracking.reconcile import Heartbeat
        from dlilabs.tracking.store import connect

        # Connecting sets up the store (under its lock) and ends runs left RUNNING by
        # processes that are gone, before the sweep's jobs start.
        experiment_id = connect(config.tracking)
        client = mlflow.MlflowClient()
        overrides = list(config.hydra.overrides.task)
        key = resume.sweep_key(str(config.lab), overrides)
        previous = None
        if config.sweep.get("resume", True):
            previous = resume.previous_parent(client, experiment_id, key)
        if previous is not None:
            run_id = previous.info.run_id
            resume.reopen(client, previous, config)
        else:
            run_id = self.new_parent(config, experiment_id, key)
        Heartbeat(run_id).start()  # stops by itself once the parent has ended
        os.environ[PARENT_ENV] = run_id
        os.environ[VARYING_ENV] = ",".join(sweep_keys(overrides))  # a search adds its space
        os.environ[RANK_ENV] = f"{config.sweep.metric},{config.sweep.goal}"
        log.info("MLflow parent run %s for this sweep", run_id)

    @staticmethod
    def new_parent(config: DictConfig, experiment_id: str, key: str) -> str:
        """Create the sweep's parent run (owned by this process, the sweep's overrides as
        params; a search adds its own); return its id."""
        import mlflow
        from mlflow.entities import Param

        from dlilabs.tracking.reconcile import owner_tags

        overrides = list(config.hydra.overrides.task)
        client = mlflow.MlflowClient()
        run = client.create_run(
            experiment_id,
            run_name=f"sweep {config.lab} " + " ".join(overrides),
            tags={
                "sweep": "parent",
                "sweep.key": key,  # lab + overrides: a re-run of this sweep finds it
                "lab": str(config.lab),
                "demo": str(config.demo).lower(),
                "sweep.dir": str(config.hydra.sweep.dir),
                **owner_tags(),  # this process: reconcile ends the parent if it dies
            },
        )
        # "+hparams_search=x" -> override.hparams_search (MLflow refuses "+" in a name).
        params = {
            f"override.{k.lstrip('+~')}": v for k, _, v in (o.partition("=") for o in overrides)
        }
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        return run.info.run_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = os.environ.get(PARENT_ENV)
        if config.hydra.job.name != "train" or not parent:
            return
        finish_parent(parent, config.sweep.metric, config.sweep.goal, "FINISHED")


def finish_parent(parent: str, metric: str, goal: str, status: str) -> None:
    """Log the sweep's summary on the parent run and end it with `status`."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent).info.experiment_id
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    best = best_child(children, metric, goal)
    # A search names its best trial (dlilabs.tracking.search): the same run, ties included.
    best_trial = client.get_run(parent).data.tags.get("best_trial.run_id")
    best = next((run for run in children if run.info.run_id == best_trial), best)
    if best is not None:
        client.set_tag(parent, "best_child.run_id", best.info.run_id)
        client.set_tag(parent, "best_child.name", best.info.run_name)
        for name in (metric, "final/gap/accuracy", "best_epoch/gap/accuracy", "gap/mse"):
            if name in best.data.metrics:
                client.log_metric(parent, f"best_child/{name}", best.data.metrics[name])
        log.info("Sweep best: %s (%s %.4f)", best.info.run_name, metric, best.data.metrics[metric])
    client.log_metric(parent, "children", len(children))
    client.log_text(parent, summary_table(children, metric), "sweep_summary.md")
    client.set_terminated(parent, status)
    for variable in (PARENT_ENV, VARYING_ENV, RANK_ENV, STUDY_ENV, resume.DONE_ENV):
        os.environ.pop(variable, None)


def close_unfinished_parent(status: str) -> None:
    """After a sweep that raised (a job failed, Ctrl-C): end its parent run with `status`."""
    parent = os.environ.get(PARENT_ENV)
    if parent:
        metric, _, goal = os.environ.get(RANK_ENV, "best/val/accuracy,max").partition(",")
        try:
            finish_parent(parent, metric, goal, status)
        except Exception as error:  # the store may be what failed; do not mask the cause
            log.warning("could not close the sweep's parent run %s: %s", parent, error)
