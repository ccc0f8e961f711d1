"""Finding runs in the store: the finished lab runs that `dlilabs.compare` sets side by side."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from dlilabs.ground.errors import UserError

# What the chart and table need from a run (the train stage logs them as summaries).
REQUIRED = ("best/val/accuracy", "final/val/accuracy", "final/gap/accuracy")


def client_for(uri: str) -> MlflowClient:
    """A client for `uri`, refusing a SQLite path that does not exist (MLflow would create an
    empty store there and report no runs, hiding the typo)."""
    database = uri.removeprefix("sqlite:///")
    if database != uri and not Path(database).is_file():
        raise UserError(
            f"no MLflow store at {database}: run the pipeline first (`dvc repro` "
            "or `make demo`), or pass --tracking-uri"
        )
    return MlflowClient(uri)


def find_runs(
    client: MlflowClient, experiment: str, filter_string: str = "", all_runs: bool = False
) -> list[Run]:
    """Finished runs of `experiment` matching the MLflow `filter_string` that carry the
    summary metrics (image labs), newest first; only the newest per lab unless `all_runs`."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise UserError(
            f"no experiment {experiment!r} in the MLflow store {client.tracking_uri}"
            f" (experiments there: {names}); run the pipeline first or pass "
            "--experiment"
        )
    query = " and ".join(filter(None, ["attributes.status = 'FINISHED'", filter_string]))
    try:
        runs = client.search_runs(
            [found.experiment_id], query, max_results=5000, order_by=["attributes.start_time DESC"]
        )
    except MlflowException as error:
        raise UserError(
            f"--filter {filter_string!r} is not a valid MLflow filter: "
            f"{error.message}. Example: \"tags.demo = 'false'\" or "
            "\"params.model.name = 'cnn'\""
        ) from None
    runs = [run for run in runs if all(key in run.data.metrics for key in REQUIRED)]
    if not all_runs:
        latest: dict[str, Run] = {}
        for run in runs:
            latest.setdefault(run.data.tags.get("lab", run.info.run_name), run)
        runs = list(latest.values())
    if not runs:
        raise UserError(
            f"no finished lab run with {REQUIRED[0]} in experiment {experiment!r}"
            f"{f' matching {filter_string!r}' if filter_string else ''}: train a "
            "lab first (dvc repro), or widen --filter"
        )
    return runs
