"""Everything that talks to MLflow or to a store, in one package.

    store       connect to the store (SQLite or a tracking server) under a lock, survive it
                going away
    labrun      a lab run: tags, params, per-epoch metrics, its outputs, its lifecycle
    modellog    the logged (and registered) model, without MLflow's extra checks
    reconcile   runs' owners and heartbeats; ending runs whose process is gone
    evaluation  what evaluate records in the train run, without touching its status
    forked      `aside`: a stage's MLflow side in a forked process, beside its TensorFlow work
    registry    the `champion` alias; loading registered models
    lineage     datasets as MLflow inputs tied to DVC, the tags `reproduce` replays
    dvcdata     what identifies a prepared split: content digest, DVC md5, dvc.lock state
    cards       a model card for every registered version
    query       finding finished lab runs (dlilabs.compare)
    sweep       Hydra multirun as one parent run with a child per job
    resume      re-running a stopped sweep runs only what it had not finished
    restart     a run stopped mid-training continues from its epoch checkpoint, same run
    slurm       sweeps on SLURM that wait for every job; where a run ran (slurm.* tags)
    search      Optuna as a Hydra sweeper (hydra/sweeper=optuna), its study in a store
    trial       a search job's side: its reopened trial, pruning, its objective
    teamserver  the team server: `mlflow server` (optionally with its login) over...
    postgres    ...a password-protected PostgreSQL cluster in the same folder
    uiview      what the MLflow UI opens on: experiment kind, description, the story view
    buckets     S3 buckets of the artifact store and the DVC remote: one line when unusable

The names below are what the stages use. They load lazily, on first use, so that a stage
which never logs (download, preprocess) does not pay for importing MLflow and Keras.
"""

from __future__ import annotations

import atexit
import importlib
import sys

_EXPORTS = {
    "connect": "store",
    "tracking_user_error": "store",
    "run_tags": "labrun",
    "data_tags": "labrun",
    "lab_run": "labrun",
    "log_config": "labrun",
    "log_metrics": "labrun",
    "finish_run": "labrun",
    "EpochLogger": "labrun",
    "flatten_config": "labrun",
    "evaluation_of": "evaluation",
    "log_evaluation": "evaluation",
    "record_evaluation": "evaluation",
    "aside": "forked",
    "update_champion": "registry",
    "lineage_tags": "lineage",
    "log_datasets": "lineage",
    "log_eval_datasets": "lineage",
    "update_card": "cards",
    "run_record": "lineage",
    "tag_run": "lineage",
    "arrays_sha256": "dvcdata",
    "child_tags_and_name": "sweep",
    "job_overrides": "sweep",
    "in_sweep": "sweep",
    "close_unfinished_parent": "sweep",
    "finished_in_sweep": "sweep",
    "search_callbacks": "trial",
    "job_result": "trial",
    "find_stale": "reconcile",
    "end_stale": "reconcile",
    "running_runs": "reconcile",
    "restartable": "restart",
    "resume_tags": "restart",
    "log_missing_epochs": "restart",
    "run_tag": "restart",
    "finished_before_stop": "restart",
    "record_failed_start": "slurm",
    "dvc_bucket": "buckets",
    "bucket_problem": "buckets",
}
__all__ = sorted(_EXPORTS)


# The MLflow modules whose store classes pool database connections (store.close_connections).
STORE_MODULES = (
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
)


def _close_store_connections() -> None:
    """At exit, if this process opened an MLflow SQL store: `store.close_connections` (the
    commands end without Python's teardown, which used to close them). Registered here, on
    the package every MLflow user in dlilabs imports (the import-linter contracts)."""
    if any(name in sys.modules for name in STORE_MODULES):
        from dlilabs.tracking.store import close_connections

        close_connections()


atexit.register(_close_store_connections)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dlilabs.tracking' has no attribute {name!r}")
    module = importlib.import_module(f"dlilabs.tracking.{_EXPORTS[name]}")
    return getattr(module, name)
