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
experiment name) still come from conf/ through `dlilabs.ground.config.compose`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd
import yaml

from dlilabs.ground.config import project_root
from dlilabs.ground.errors import UserError
from dlilabs.tracking.query import client_for, find_runs

log = logging.getLogger("dlilabs.compare")


def lab_order(root: Path) -> list[str]:
    """The labs in the course's order (params.yaml: MLP, MLP, CNN, CNN + augmentation)."""
    try:
        return list(yaml.safe_load((root / "params.yaml").read_text())["labs"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []


def comparison_table(runs: list, order: list[str], all_runs: bool = False) -> pd.DataFrame:
    """One row per run, in course order then by start time: label, lab, run, model,
    augment, epochs, the accuracy summaries and, when evaluated, eval/val_accuracy."""
    rows = []
    for run in runs:
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        lab = tags.get("lab", run.info.run_name)
        model, augment = params.get("model.name", "?"), params.get("augment.name", "?")
        kind = model.upper() + ("" if augment == "none" else f" + {augment} augmentation")
        if tags.get("data"):  # runs that say their data (profile=demo: data=mnist_5k)
            kind += f"\non {tags['data']}"
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
    from dlilabs.ground.config import compose

    tracking = compose().tracking
    return tracking.uri, tracking.experiment_name


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
        client = client_for(args.tracking_uri)
        runs = find_runs(client, args.experiment, args.filter, args.all_runs)
        table = comparison_table(runs, lab_order(root), args.all_runs)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from dlilabs.core import plots  # matplotlib after the cheap checks: errors come fast

    markdown = to_markdown(table)
    picture = plots.save(plots.comparison(table), args.out / "comparison.png")
    (args.out / "comparison.md").write_text(markdown)
    print(markdown + f"\nWrote {picture} and {args.out / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    from dlilabs.ground.startup import quiet_tensorflow_startup, run_command

    quiet_tensorflow_startup()  # the command's process only, not on import (tests call main)
    run_command(main)
