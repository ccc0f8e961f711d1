"""What the evaluate stage records in the train stage's MLflow run.

Evaluate logs into the run the train stage made (its id is in `run.json`) through the
client, never by resuming the run: the train run's lifecycle (FINISHED, its end time) is
the train stage's alone. Evaluate's own outcome is in tags: `eval.status` (running,
finished, failed) and, when it failed, `eval.error`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric

from dlilabs.tracking.store import retry_if_locked


@contextlib.contextmanager
def evaluation_of(run_id: str) -> Iterator[MlflowClient]:
    """Mark run `run_id` as being evaluated; on success tag it `eval.status=finished`, on any
    error `failed` with `eval.error` (the error's first line), and re-raise. Yields a client."""
    client = MlflowClient()
    retry_if_locked(client.set_tag, run_id, "eval.status", "running")
    try:
        yield client
    except BaseException as error:
        kind = getattr(error, "kind", type(error).__name__)  # aside.StageFailed: the stage's
        reason = (str(error).strip().splitlines() or [kind])[0]
        with contextlib.suppress(Exception):  # the store may be what failed: keep the cause
            client.set_tag(run_id, "eval.status", "failed")
            client.set_tag(run_id, "eval.error", f"{kind}: {reason}"[:4000])
        raise
    retry_if_locked(client.set_tag, run_id, "eval.status", "finished")
    with contextlib.suppress(Exception):
        client.delete_tag(run_id, "eval.error")  # a failure of an earlier attempt is history


def log_evaluation(
    client: MlflowClient,
    run_id: str,
    metrics: dict[str, float],
    matrix: np.ndarray,
    class_names: list[str],
    files: list[Path],
    figures: list[Path],
) -> None:
    """Log `metrics` (name -> value), the confusion matrix (classes, classes; rows = actual),
    the evaluation `files` (under `evaluation/`) and `figures` (under `plots/`) to `run_id`."""
    now = int(time.time() * 1000)
    batch = [Metric(name, float(value), now, 0) for name, value in metrics.items()]
    for start in range(0, len(batch), 1000):  # log_batch takes at most 1000 metrics
        retry_if_locked(client.log_batch, run_id, metrics=batch[start : start + 1000])
    client.log_dict(
        run_id,
        {"classes": class_names, "rows_actual": matrix.tolist()},
        "evaluation/confusion_matrix.json",
    )
    for path in files:
        client.log_artifact(run_id, str(path), "evaluation")
    for path in figures:
        client.log_artifact(run_id, str(path), "plots")


def record_evaluation(cfg, run_info: dict, receive) -> None:
    """The evaluate stage's MLflow side (`aside`'s work): connect, mark the train run
    `run_info["run_id"]` as being evaluated, then log what `receive()` returns (the keyword
    arguments of `log_evaluation` but the client and run id), the evaluation datasets, the
    champion alias and the model card; a failure of the stage (`receive()` raises) is
    recorded as the run's eval.status and eval.error."""
    from dlilabs.tracking.cards import update_card
    from dlilabs.tracking.lineage import log_eval_datasets
    from dlilabs.tracking.registry import update_champion
    from dlilabs.tracking.store import connect

    run_id = run_info["run_id"]
    connect(cfg.tracking)
    with evaluation_of(run_id) as client:
        log_evaluation(client, run_id, **receive())
        log_eval_datasets(client, run_id, cfg)
        if run_info.get("registered_version"):
            update_champion(client, run_info["registered_model"], run_info["registered_version"])
        update_card(client, cfg, run_info)  # now with the confusion matrix
