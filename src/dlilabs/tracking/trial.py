"""A search job's side of its Optuna trial: reopen it, report epochs to it, return its objective.

The Optuna sweeper (`dlilabs.tracking.search`) gives each job `sweep.trial=<number>`. The job
reopens that trial from the study's storage (`optuna.trial.Trial(study, trial_id)`, with the
pruner the sweeper config names), so `TrialPruning` (dlilabs.core.pruning) can report every epoch
to it and stop the job when the pruner says so. A pruned job still ends FINISHED, tagged
`pruned=true` and `pruned_at_epoch`, with its partial curves, and it marks its trial
`pruned_at_epoch` so the sweeper tells the study PRUNED. The job's objective (what the
sweeper tells the study, `optimized_metric` of its results, with an optional floor) is
logged on its run as `search/objective`.
"""

from __future__ import annotations

import logging
import math
import os

from omegaconf import DictConfig

from dlilabs.ground.errors import UserError

log = logging.getLogger("dlilabs.search")
OBJECTIVE = "search/objective"


def trial_number(cfg: DictConfig) -> int | None:
    """The job's trial number in an Optuna search, None otherwise."""
    sweep = cfg.get("sweep") or {}
    number = sweep.get("trial")
    return None if number is None else int(number)


def open_trial(cfg: DictConfig):
    """The job's `optuna.trial.Trial`, reopened from the study's storage (None outside a
    search), with the study's pruner from `hydra.sweeper.pruner`."""
    number = trial_number(cfg)
    if number is None:
        return None
    import optuna
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    from dlilabs.tracking.search import open_storage
    from dlilabs.tracking.sweep import STUDY_ENV

    sweeper = HydraConfig.get().sweeper
    storage = open_storage(sweeper.storage)
    name = os.environ.get(STUDY_ENV) or sweeper.study_name
    pruner = instantiate(sweeper.pruner) if sweeper.get("pruner") else optuna.pruners.NopPruner()
    # The sampler is the sweeper's business; a job only reports, so any cheap one will do.
    study = optuna.load_study(
        study_name=name, storage=storage, pruner=pruner, sampler=optuna.samplers.RandomSampler()
    )
    study_id = storage.get_study_id_from_name(name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    return optuna.trial.Trial(study, trial_id)


def search_callbacks(cfg: DictConfig) -> list:
    """Keras callbacks a train job adds in an Optuna search: report `hydra.sweeper.report`
    (a history column, val_accuracy by default) to its trial and stop when pruned. []
    outside a search."""
    trial = open_trial(cfg)
    if trial is None:
        return []
    import mlflow
    from hydra.core.hydra_config import HydraConfig

    from dlilabs.core.pruning import TrialPruning
    from dlilabs.tracking.search import PRUNED_ATTR

    monitor = HydraConfig.get().sweeper.get("report") or "val_accuracy"

    def on_prune(epoch: int, value: float) -> None:
        trial.set_user_attr(PRUNED_ATTR, epoch)
        mlflow.set_tags({"pruned": "true", PRUNED_ATTR: str(epoch)})
        log.info("trial %d pruned after epoch %d (%s %.4f)", trial.number, epoch, monitor, value)

    return [TrialPruning(trial, monitor, on_prune)]


def objective_value(result: dict, metric: str, goal: str, floor: DictConfig | None) -> float:
    """`result[metric]`; with a floor ({metric, min, penalty}), a result whose floor metric is
    below `min` scores `penalty + shortfall` (negated when the goal is max): worse than any
    real value and better the closer it came. Raises UserError for a metric not there."""
    for name in (metric, *([floor.metric] if floor else [])):
        if not isinstance(result.get(name), int | float):
            known = ", ".join(sorted(k for k, v in result.items() if isinstance(v, int | float)))
            raise UserError(f"optimized_metric / sweep.floor: {name!r} is not a result: {known}")
    value = float(result[metric])
    if floor and result[floor.metric] < floor.min:
        shortfall = float(floor.min - result[floor.metric])
        penalty = float(floor.get("penalty", 1.0)) + shortfall
        value = penalty if goal == "min" else -penalty
    return value


def job_result(cfg: DictConfig, result: object) -> object:
    """What a job returns to Hydra: `result` as is, or, when `optimized_metric` is set or the
    job is a search trial, its objective (a float, also logged as `search/objective` on the
    job's run unless the trial was pruned: a partial run is nobody's best)."""
    metric = cfg.get("optimized_metric")
    if not metric and trial_number(cfg) is not None:
        metric = cfg.sweep.metric
    if not metric or not isinstance(result, dict):
        return result
    if metric == OBJECTIVE:
        raise UserError(f"optimized_metric: {OBJECTIVE} is what it computes; name a result")
    value = objective_value(result, metric, cfg.sweep.goal, cfg.sweep.get("floor"))
    run_id = result.get("run_id")
    if run_id and not result.get("skipped") and math.isfinite(value):
        import mlflow

        client = mlflow.MlflowClient()
        if client.get_run(run_id).data.tags.get("pruned") != "true":
            client.log_metric(run_id, OBJECTIVE, value)
    return value
