"""`python -m dlilabs.compare`: the labs side by side, read from the MLflow store.

    python -m dlilabs.compare                                   # latest run of each lab
    python -m dlilabs.compare --experiment dlilabs-demo         # the demo's runs
    python -m dlilabs.compare --filter "params.trainer.epochs = '20'" --all-runs
    python -m dlilabs.compare --tracking-uri http://127.0.0.1:5001 --out docs/results

Writes `comparison.png` (best and final validation accuracy and the last epoch's gap per
run: MLP vs CNN vs CNN + augmentation, the course's story in one picture) and `comparison.md`
(the same numbers as a Markdown table, also printed) to `--out` (default
`<project>/build/reports`, git-ignored: regenerate it, or pass `--out` to keep a copy).

A plain argparse CLI, not Hydra: the one free-form argument is an MLflow filter string, whose
quotes, spaces and `=` Hydra's override grammar would have to escape. The defaults (store URI,
experiment name) still come from conf/ through `dlilabs.config.compose`.

Also here: `update_champion`, which the evaluate stage calls to move a registered model's
`champion` alias to a better version.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from dlilabs.config import project_root
from dlilabs.errors import UserError

log = logging.getLogger("dlilabs.compare")

CHAMPION = "champion"
# What the chart and table need from a run (the train stage logs them as summaries).
REQUIRED = ("best/val/accuracy", "final/val/accuracy", "final/gap/accuracy")


def update_champion(
    client: MlflowClient,
    name: str,
    version: int | str,
    metric: str = "eval/val_accuracy",
    alias: str = CHAMPION,
) -> bool:
    """Point `alias` of registered model `name` at `version` if its run's `metric` beats the
    current holder's (or nobody holds it). Returns True when the alias now names `version`."""
    version = str(version)
    candidate = _version_metric(client, name, version, metric)
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no version holds the alias yet
        holder = None
    if holder is not None and str(holder.version) != version:
        current = _version_metric(client, name, holder.version, metric)
        if not candidate > current:  # NaN never wins; ties keep the older champion
            log.info(
                "%s v%s: %s %.4f does not beat @%s v%s (%.4f)",
                name,
                version,
                metric,
                candidate,
                alias,
                holder.version,
                current,
            )
            return False
    client.set_registered_model_alias(name, alias, version)
    log.info("%s v%s is now @%s (%s %.4f)", name, version, alias, metric, candidate)
    return True


def _version_metric(client: MlflowClient, name: str, version: str, metric: str) -> float:
    """The latest value of `metric` in the run that produced model version `version`."""
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        return float("nan")
    return client.get_run(run_id).data.metrics.get(metric, float("nan"))


def lab_order(root: Path) -> list[str]:
    """The labs in the course's order (params.yaml: MLP, MLP, CNN, CNN + augmentation)."""
    try:
        return list(yaml.safe_load((root / "params.yaml").read_text())["labs"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []


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


def comparison_table(runs: list[Run], order: list[str], all_runs: bool = False) -> pd.DataFrame:
    """One row per run, in course order then by start time: label, lab, run, model,
    augment, epochs, the accuracy summaries and, when evaluated, eval/val_accuracy."""
    rows = []
    for run in runs:
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        lab = tags.get("lab", run.info.run_name)
        model, augment = params.get("model.name", "?"), params.get("augment.name", "?")
        kind = model.upper() + ("" if augment == "none" else f" + {augment} augmentation")
        rows.append(
            {
                "label": f"{lab}\n{kind}" + (f"\n{run.info.run_id[:8]}" if all_runs else ""),
                "lab": lab,
                "run": f"{run.info.run_name} ({run.info.run_id[:8]})",
                "model": model,
                "augment": augment,
                "epochs": params.get("trainer.epochs", "?"),
                "best_val_accuracy": metrics["best/val/accuracy"],
                "best_epoch": int(metrics.get("best_epoch", 0)),
                "final_val_accuracy": metrics["final/val/accuracy"],
                "final_gap_accuracy": metrics["final/gap/accuracy"],
                "eval_val_accuracy": metrics.get("eval/val_accuracy", float("nan")),
                "start": run.info.start_time,
            }
        )
    table = pd.DataFrame(rows)
    rank = {lab: index for index, lab in enumerate(order)}
    table["rank"] = table["lab"].map(lambda lab: rank.get(lab, len(rank)))
    table = table.sort_values(["rank", "lab", "start"]).drop(columns=["rank", "start"])
    return table.reset_index(drop=True)


def to_markdown(table: pd.DataFrame) -> str:
    """The comparison as a GitHub Markdown table, accuracies to 4 decimals."""
    header = (
        "| lab | run | model | augment | epochs | best val acc (epoch) | final val acc "
        "| final gap (train - val) | eval val acc |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    for row in table.itertuples():
        evaluated = "" if pd.isna(row.eval_val_accuracy) else f"{row.eval_val_accuracy:.4f}"
        lines.append(
            f"| {row.lab} | {row.run} | {row.model} | {row.augment} | {row.epochs} | "
            f"{row.best_val_accuracy:.4f} ({row.best_epoch}) | "
            f"{row.final_val_accuracy:.4f} | {row.final_gap_accuracy:.4f} | "
            f"{evaluated} |"
        )
    return "\n".join(lines) + "\n"


def default_store(root: Path) -> tuple[str, str]:
    """(tracking URI, experiment name) as the stages would use them (conf/tracking)."""
    from dlilabs.config import compose

    tracking = compose().tracking
    return tracking.uri, tracking.experiment_name


def connect(uri: str) -> MlflowClient:
    """A client for `uri`, refusing a SQLite path that does not exist (MLflow would create an
    empty store there and report no runs, hiding the typo)."""
    database = uri.removeprefix("sqlite:///")
    if database != uri and not Path(database).is_file():
        raise UserError(
            f"no MLflow store at {database}: run the pipeline first (`dvc repro` "
            "or `make demo`), or pass --tracking-uri"
        )
    return MlflowClient(uri)


def parse_args(argv: list[str] | None, root: Path) -> argparse.Namespace:
    """The command line; defaults from conf/ (store, experiment) and the project folder."""
    uri, experiment = default_store(root)
    parser = argparse.ArgumentParser(
        prog="python -m dlilabs.compare",
        description="Compare lab runs from the MLflow store: a PNG chart and a Markdown table.",
    )
    parser.add_argument(
        "--filter",
        default="",
        help="MLflow search filter, e.g. \"tags.demo = 'false'\" or \"params.model.name = 'cnn'\"",
    )
    parser.add_argument("--experiment", default=experiment, help=f"default: {experiment}")
    parser.add_argument(
        "--all-runs",
        action="store_true",
        help="every matching run, not only the latest of each lab",
    )
    parser.add_argument("--tracking-uri", default=uri, help=f"default: {uri}")
    parser.add_argument(
        "--out",
        type=Path,
        default=root / "build" / "reports",
        help="folder for comparison.png and comparison.md (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Find the runs, write comparison.png and comparison.md, print the table."""
    logging.basicConfig(level=logging.WARNING)
    try:
        root = project_root()
        args = parse_args(argv, root)
        client = connect(args.tracking_uri)
        runs = find_runs(client, args.experiment, args.filter, args.all_runs)
        table = comparison_table(runs, lab_order(root), args.all_runs)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from dlilabs import plots  # matplotlib after the cheap checks: errors come fast

    markdown = to_markdown(table)
    picture = plots.save(plots.comparison(table), args.out / "comparison.png")
    (args.out / "comparison.md").write_text(markdown)
    print(markdown + f"\nWrote {picture} and {args.out / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
