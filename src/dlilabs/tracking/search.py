"""Hyperparameter search: Optuna as a Hydra sweeper (`hydra/sweeper=optuna`), study in a store.

`OptunaSearch` is what `hydra_plugins.dlilabs_optuna_sweeper.OptunaSweeper` runs (Hydra only
accepts sweeper classes from its `hydra_plugins` package; this one keeps Optuna and MLflow
on our side of the layers). It reads Hydra's override grammar as the search space, as Hydra's
own Optuna plugin does: `choice(a, b)`, `interval(lo, hi)`, `tag(log, interval(lo, hi))`,
`range(lo, hi, step)`, from `hydra.sweeper.params` and the command line. Then, `n_jobs`
trials at a time: ask the study for trials, launch one job per trial through the configured
launcher (each job gets the trial's values plus `sweep.trial=<number>`, so it can reopen its
trial and report every epoch to the pruner: `dlilabs.tracking.trial`), and tell the study
what each job returned: its objective, PRUNED when the job stopped on its pruner's word
(the trial's `pruned_at_epoch` attribute), FAIL when it raised.

The study lives in an Optuna RDB storage (`hydra.sweeper.storage`: SQLite beside mlflow.db by
default) under `hydra.sweeper.study_name`, created or, when it exists, continued.
Why not Hydra's plugin itself: hydra-optuna-sweeper 1.2.0 and 1.3.0 both require
optuna<3, whose RDB storage fails on the SQLAlchemy 2 that MLflow 3 brings (measured:
`AssertionError` in `get_current_version` on a new SQLite study), so it could only keep a
study in memory: no resume, and no trial for a job to report to.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dlilabs.ground.errors import UserError
from dlilabs.tracking.sweep import PARENT_ENV, STUDY_ENV, VARYING_ENV

log = logging.getLogger("dlilabs.search")

PRUNED_ATTR = "pruned_at_epoch"  # the trial attribute a pruned job sets (tracking.trial)


def open_storage(url: str):
    """Optuna's RDB storage at `url`; a SQLite file gets its folder and a 60 s lock timeout
    (the jobs of a parallel search report to the same file)."""
    import optuna

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(url)


def redacted(url: str) -> str:
    """A storage URL without its password: `postgresql://mlflow:***@host/optuna`."""
    return re.sub(r"(//[^:/@]+):[^@/]*@", r"\1:***@", url)


def distribution(override) -> Any:
    """One parsed override -> an Optuna distribution (a sweep) or its value string (fixed)."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    key = override.get_key_element()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(Transformer.encode)))
    if override.is_range_sweep():  # range(lo, hi, step): hi excluded, as in Python
        values = list(override.sweep_iterator())
        if all(isinstance(item, int) for item in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(values[0], values[-1], step=float(value.step))
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise UserError(f"{key}: {override.input_line} is not a search space Optuna takes")


def search_space(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Overrides (`model.dropout=interval(0.1,0.5)`, `experiment=asl_cnn`) ->
    ({"model.dropout": FloatDistribution(...)}, ["experiment=asl_cnn"]): what to search and
    what every job gets as is; of two overrides of one key, the later counts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(overrides):
        found = distribution(override)
        key = override.get_key_element()
        # The later one wins: `model.dense_units=128` on the command line takes the key out of
        # the search space of hydra.sweeper.params (as in Hydra's own Optuna plugin).
        space.pop(key, None)
        fixed.pop(key, None)
        if isinstance(found, str):
            fixed[key] = f"{key}={found}"
        else:
            space[key] = found
    return space, list(fixed.values())


def params_overrides(params: DictConfig | None) -> list[str]:
    """`hydra.sweeper.params` ({"model.dropout": "interval(0.1, 0.5)"}) as override strings."""
    return [f"{key}={value}" for key, value in (params or {}).items()]


def override_value(value: Any) -> str:
    """A sampled value as Hydra's override grammar reads it back (None -> null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def direction_of(direction: str | None, goal: str) -> str:
    """The study's direction: the sweeper's own, else from `sweep.goal` (max -> maximize)."""
    return direction or ("maximize" if goal == "max" else "minimize")


class OptunaSearch:
    """The sweep loop; the arguments are the `hydra.sweeper` config's keys (the sampler and
    pruner already instantiated by Hydra)."""

    def __init__(self, **settings: Any):
        self.settings = settings
        self.stopped = False  # the sampler ran out of combinations (grid, brute force)

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )

    def open_study(self):
        import optuna

        settings = self.settings
        return optuna.create_study(
            study_name=settings["study_name"],
            storage=open_storage(settings["storage"]),
            sampler=settings["sampler"],
            pruner=settings.get("pruner") or optuna.pruners.NopPruner(),
            direction=direction_of(settings.get("direction"), self.config.sweep.goal),
            load_if_exists=True,  # a second invocation continues the study
        )

    def sweep(self, arguments: list[str]) -> list:
        settings = self.settings
        space, fixed = search_space([*params_overrides(settings.get("params")), *arguments])
        if not space:
            raise UserError(
                "the Optuna sweeper has nothing to search: give hydra.sweeper.params "
                "(e.g. hparams_search=mnist_mlp_optuna) or an interval(...)/choice(...) override"
            )
        study = self.open_study()
        os.environ[STUDY_ENV] = study.study_name  # for the jobs (a null name gets one)
        varying = [k for k in os.environ.get(VARYING_ENV, "").split(",") if k]
        os.environ[VARYING_ENV] = ",".join([*varying, *space])  # children named by them
        record_on_parent(self.config)
        before = len(study.trials)
        Path(self.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        log.info(
            "Optuna study %r in %s: %s; %d trial(s), %d at a time; searching %s",
            study.study_name,
            redacted(settings["storage"]),
            f"continued after {before} trials" if before else "new",
            settings["n_trials"],
            settings["n_jobs"],
            ", ".join(space),
        )
        returns: list = []
        remaining = int(settings["n_trials"])
        while remaining > 0 and not self.stopped:
            trials = [study.ask(space) for _ in range(min(int(settings["n_jobs"]), remaining))]
            batch = [
                [*fixed, *(f"{k}={override_value(v)}" for k, v in t.params.items())]
                + [f"sweep.trial={t.number}"]
                for t in trials
            ]
            try:
                results = self.launcher.launch(batch, initial_job_idx=len(returns))
            except BaseException:  # Ctrl-C, a launcher error: no trial stays RUNNING
                for trial in trials:
                    self.tell(study, trial, "FAIL")
                raise
            returns.extend(results)
            self.tell_batch(study, trials, results)
            remaining -= len(trials)
        summarise(study, study.trials[before:])
        return returns

    def tell_batch(self, study, trials: list, results: list) -> None:
        """Tell the study each job's outcome; raise when more than max_failure_rate failed."""
        failed = []
        pruned = pruned_numbers(study)
        for trial, result in zip(trials, results, strict=True):
            try:
                value = result.return_value  # raises the job's error
            except Exception as error:
                log.warning("trial %d failed: %s", trial.number, error)
                self.tell(study, trial, "FAIL")
                failed.append(result)
                continue
            if trial.number in pruned:
                self.tell(study, trial, "PRUNED")
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.tell(study, trial, "FAIL")
                raise UserError(
                    "a train job returned no objective: set optimized_metric (e.g. "
                    "optimized_metric=best/val/accuracy) for the Optuna sweeper"
                ) from None
            self.tell(study, trial, "COMPLETE", number)
        if failed and len(failed) / len(results) > float(self.settings["max_failure_rate"]):
            failed[0].return_value  # noqa: B018 (raises the first failed job's error)

    def tell(self, study, trial, state: str, value: float | None = None) -> None:
        import optuna

        try:
            study.tell(trial, value, state=optuna.trial.TrialState[state], skip_if_finished=True)
        except RuntimeError as error:  # "Study.stop ...": a grid or brute-force sampler is done
            if "Study.stop" not in str(error):
                raise
            log.info("the sampler has tried every combination of the search space")
            self.stopped = True


def pruned_numbers(study) -> set[int]:
    """Numbers of the study's running trials whose job set PRUNED_ATTR. Read afresh from the
    storage (`study.get_trials`), since the jobs wrote it; a `Trial`'s own `user_attrs` is the
    copy cached in this process when it was asked."""
    import optuna

    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return {trial.number for trial in running if PRUNED_ATTR in trial.user_attrs}


def summarise(study, trials: list) -> None:
    """Log the search's outcome; on the sweep's MLflow parent run: trial counts by state and
    the study's best trial (number, value, params, and its child run)."""
    counts = Counter(trial.state.name for trial in trials)
    log.info("Search: %s", ", ".join(f"{n} {state.lower()}" for state, n in counts.items()))
    best = None
    if any(trial.state.name == "COMPLETE" for trial in study.trials):
        best = study.best_trial
        log.info("Best trial: %d, value %.4f, %s", best.number, best.value, best.params)
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    import mlflow

    client = mlflow.MlflowClient()
    for state in ("COMPLETE", "PRUNED", "FAIL"):
        client.log_metric(parent, f"search/trials_{state.lower()}", counts.get(state, 0))
    client.log_metric(parent, "search/trials_in_study", len(study.trials))
    if best is None:
        return
    tags = {
        "best_trial.number": str(best.number),
        "best_trial.value": f"{best.value:.6g}",
        "best_trial.params": json.dumps(best.params),
    }
    experiment_id = client.get_run(parent).info.experiment_id
    found = client.search_runs(
        [experiment_id],
        f"tags.`search.study` = '{study.study_name}' and tags.`search.trial` = '{best.number}'",
        max_results=1,
    )
    if found:
        tags["best_trial.run_id"] = found[0].info.run_id
        tags["best_trial.name"] = found[0].info.run_name
    for key, value in tags.items():
        client.set_tag(parent, key, value)


def record_on_parent(config: DictConfig) -> None:
    """The search's settings as params of the sweep's parent run (a resumed parent has them)."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    if any(key.startswith("search.") for key in client.get_run(parent).data.params):
        return
    params = [Param(key, value) for key, value in parent_params(config).items()]
    client.log_batch(parent, params=params)


def described_floor(floor: DictConfig | None) -> str:
    """`{metric: best/val/accuracy, min: 0.9, penalty: 1}` -> "best/val/accuracy >= 0.9 ..."."""
    if not floor:
        return "none"
    return f"{floor.metric} >= {floor.min} (else penalty {floor.get('penalty', 1.0)} + shortfall)"


def parent_params(config: DictConfig) -> dict[str, str]:
    """What the parent run of a search records as params: the search space, the objective,
    the study and its storage (no password), sampler, pruner and budget."""
    sweeper = config.hydra.sweeper
    space = {f"search.space.{k}": str(v) for k, v in (sweeper.get("params") or {}).items()}

    def described(node) -> str:  # {"_target_": "optuna.samplers.TPESampler", seed: 1} -> text
        if not node:
            return "none"
        args = OmegaConf.to_container(node, resolve=True).items()
        text = ", ".join(f"{k}={v}" for k, v in args if k[0] != "_")
        return f"{node._target_.rsplit('.', 1)[-1]}({text})"

    return {
        **space,
        "search.objective": str(config.get("optimized_metric") or config.sweep.metric),
        "search.direction": direction_of(sweeper.get("direction"), config.sweep.goal),
        "search.floor": described_floor(config.sweep.get("floor")),
        "search.study": str(sweeper.study_name),
        "search.storage": redacted(str(sweeper.storage)),
        "search.sampler": described(sweeper.get("sampler")),
        "search.pruner": described(sweeper.get("pruner")),
        "search.report": str(sweeper.get("report")),
        "search.n_trials": str(sweeper.n_trials),
        "search.n_jobs": str(sweeper.n_jobs),
    }
