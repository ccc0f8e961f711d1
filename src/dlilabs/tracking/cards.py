"""Model cards: one Markdown page per registered model version, built from its run.

`write_card` runs when the train stage registers a version: the card goes to the run as the
artifact `model_card.md` and into the version's description (the registry UI shows it).
Evaluate calls `update_card` once the confusion matrix and eval metrics exist. The card's
second line (a `> ` quote) is its one-line summary, which `dlilabs.predict` prints
(`card_summary`). What the card says about the lab (what it is for, the published range,
the known limits) comes from the experiment's `published:` block (conf/experiment/<lab>.yaml).
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from dlilabs.tracking.lineage import run_datasets
from dlilabs.tracking.serving import input_section, note_older_inputs, raw_input
from dlilabs.tracking.store import retry_if_locked

log = logging.getLogger("dlilabs.tracking")

CARD = "model_card.md"
DESCRIPTION_CHARS = 5000  # the registry keeps at most 5,000 characters of a description
CONFIG_KEYS = (
    "model.name", "augment.name", "trainer.optimizer", "trainer.learning_rate",
    "trainer.batch_size", "trainer.epochs", "trainer.seed", "trainer.monitor",
)  # fmt: skip
RESULTS = (
    ("best/val/accuracy", "best validation accuracy (the saved epoch)"),
    ("best_epoch", "saved epoch"),
    ("final/val/accuracy", "final validation accuracy (last epoch)"),
    ("final/train/accuracy", "final train accuracy"),
    ("final/gap/accuracy", "overfitting gap at the last epoch (train - validation)"),
    ("best_epoch/gap/accuracy", "overfitting gap at the saved epoch"),
    ("eval/val_accuracy", "validation accuracy of the saved model (evaluate)"),
    ("eval/gap_accuracy", "gap of the saved model, no dropout or augmentation (evaluate)"),
    ("fit/mse", "mean squared error of the fitted line"),
    ("floor/mse", "least-squares floor"),
    ("gap/mse", "distance to the floor"),
)


def verdict(published: dict | None, metrics: dict, dataset: str) -> str:
    """Whether the run is inside the lab's published range, as a phrase."""
    if not published or not published.get("range"):
        reference = (published or {}).get("reference")
        return f"no published range ({reference})" if reference else "no published range"
    low, high = published["range"]
    metric = published["metric"]
    if published.get("dataset") and dataset != published["dataset"]:
        return f"not comparable: trained on {dataset}, the range is for {published['dataset']}"
    value = metrics.get(metric)
    if value is None:
        return f"unknown: the run has no {metric}"
    where = "inside" if low <= value <= high else "below" if value < low else "above"
    return f"{where} ({metric} {value:.4f})"


def summary_line(name: str, version: str, run, published: dict | None) -> str:
    """The card's one line: version, model, data, results, the published verdict."""
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    dataset = params.get("dataset.name", "?")
    parts = [f"{name} v{version}"]
    size = tags.get("model.parameters")
    parts.append(
        f"{params.get('model.name', '?')}" + (f", {int(size):,} parameters" if size else "")
    )
    rows = {d["context"]: d for d in run_datasets(run)}
    if "training" in rows and "validation" in rows:
        parts.append(
            f"{dataset} {rows['training']['rows']:,}/{rows['validation']['rows']:,} rows "
            f"(digest {rows['training']['digest'][:8]})"
        )
    else:
        parts.append(dataset)
    if "best/val/accuracy" in metrics:
        parts.append(
            f"val accuracy {metrics['best/val/accuracy']:.3f} best, "
            f"{metrics.get('final/val/accuracy', float('nan')):.3f} final, "
            f"gap {metrics.get('final/gap/accuracy', float('nan')):.3f}"
        )
    elif "fit/mse" in metrics:
        parts.append(f"MSE {metrics['fit/mse']:.3f} (floor {metrics.get('floor/mse', 0):.3f})")
    if published and published.get("range"):
        low, high = published["range"]
        parts.append(f"published {low}–{high}: {verdict(published, metrics, dataset)}")
    if "dataset.class_names" in params:  # image labs: what a client sends
        parts.append("input: raw pixels 0-255" if raw_input(run) else "input: scaled 0-1")
    return " · ".join(parts)


def data_section(run) -> list[str]:
    datasets = run_datasets(run)
    if not datasets:
        return ["No dataset inputs logged (the line fit's ten points live in its config)."]
    lines = [
        "| input | context | rows | digest | DVC path | DVC md5 | dvc.lock |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in datasets:
        lines.append(
            f"| {d['name']} | {d['context']} | {d['rows']:,} | `{d['digest']}` | "
            f"`{d.get('path', '?')}` | `{d.get('md5', '?')}` | {d.get('dvc_lock', '?')} |"
        )
    raw = next((d["raw"] for d in datasets if d.get("raw")), None)
    if raw:
        verified = {
            True: "every file's sha256 verified against conf/dataset",
            False: "NOT verified: accepted with accept_unverified",
            None: "no provenance.json",
        }
        lines.append(
            f"\nRaw download: `{raw['path']}` (DVC md5 `{raw['md5']}`; "
            f"{verified[raw.get('verified')]})."
        )
    return lines


def card_markdown(
    name: str, version: str, run, published: dict | None, confusion: str | None
) -> str:
    """The model card of version `version` of registered model `name`, from its `run`."""
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    published = published or {}
    dataset = params.get("dataset.name", "?")
    lab = tags.get("lab", name)
    commit = tags.get("git.commit", "?")[:12]
    lines = [
        f"# Model card: {name} v{version}",
        f"> {summary_line(name, version, run, published)}",
        "",
        "## The lab",
        f"`{lab}`: {published.get('about', 'no description in conf/experiment')}",
        f"Run `{run.info.run_id}`, commit `{commit}` (dirty: {tags.get('git.dirty', '?')}), "
        f"trained on {tags.get('device', '?')}.",
        "",
        "## Model",
        f"- Architecture: {tags.get('model.architecture', params.get('model.name', '?'))}",
        f"- Parameters: {int(tags['model.parameters']):,}" if "model.parameters" in tags else "",
        "",
        *input_section(name, version, run),
        "## Data",
        *data_section(run),
        "",
        "## Training config",
        ", ".join(f"{key} `{params[key]}`" for key in CONFIG_KEYS if key in params),
        f"(Hydra overrides: `{tags['hydra.overrides']}`)" if "hydra.overrides" in tags else "",
        "",
        "## Results",
        "| metric | value | meaning |",
        "|---|---|---|",
        *(
            f"| {key} | {metrics[key]:{'.0f' if key == 'best_epoch' else '.4f'}} | {meaning} |"
            for key, meaning in RESULTS
            if key in metrics
        ),
        "",
        f"Confusion matrix: `{confusion}`"
        if confusion
        else "Confusion matrix: not yet drawn (the evaluate stage adds it)",
        "",
        "## Published range",
        published_section(published, metrics, dataset),
        "",
        "## Known limits",
        *(f"- {limit}" for limit in limits(published, dataset)),
    ]
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def published_section(published: dict, metrics: dict, dataset: str) -> str:
    if not published.get("range"):
        return verdict(published, metrics, dataset)
    low, high = published["range"]
    source = published.get("source", "the course")
    return (
        f"{published['metric']} {low}–{high} on {published.get('dataset', dataset)} "
        f"({source}). This version: {verdict(published, metrics, dataset)}."
    )


def limits(published: dict, dataset: str) -> list[str]:
    """The lab's known limits, plus one when it was trained on other data (the demo)."""
    found = list(published.get("limits") or [])
    if published.get("dataset") and dataset != published["dataset"]:
        found.insert(
            0,
            f"Trained on {dataset}, not {published['dataset']} (a demo run on MNIST rows): "
            "a demonstration of the pipeline, not the lab's model.",
        )
    return found or ["None recorded."]


def _published(cfg: DictConfig) -> dict | None:
    block = cfg.get("published")
    return OmegaConf.to_container(block, resolve=True) if block is not None else None


def _confusion(client: MlflowClient, run_id: str) -> str | None:
    with contextlib.suppress(MlflowException, OSError):
        if any(a.path.endswith("confusion.png") for a in client.list_artifacts(run_id, "plots")):
            return f"runs:/{run_id}/plots/confusion.png"
    return None


def write_card(client: MlflowClient, cfg: DictConfig, run_id: str, name: str, version) -> str:
    """Build the card of version `version` of `name` from run `run_id` and the lab's
    `published` config; log it as `model_card.md` and set it as the version's description."""
    run = retry_if_locked(client.get_run, run_id)
    text = card_markdown(name, str(version), run, _published(cfg), _confusion(client, run_id))
    client.log_text(run_id, text, CARD)
    description = text
    if len(description) > DESCRIPTION_CHARS:
        note = f"\n… (the whole card: runs:/{run_id}/{CARD})\n"
        description = description[: DESCRIPTION_CHARS - len(note)] + note
    retry_if_locked(client.update_model_version, name, str(version), description=description)
    note_older_inputs(client, name, DESCRIPTION_CHARS)  # older cards: which input they take
    return text


def update_card(client: MlflowClient, cfg: DictConfig, run_info: dict) -> str | None:
    """Rewrite the card of the version run.json (`run_info`) names, if one was registered,
    now that evaluate has logged its metrics and pictures."""
    if not run_info.get("registered_version"):
        return None
    return write_card(
        client,
        cfg,
        run_info["run_id"],
        run_info["registered_model"],
        run_info["registered_version"],
    )


def card_summary(model_uri: str, tracking_uri: str) -> str | None:
    """The one-line summary of the card of `models:/<name>/<version>`, `models:/<name>@<alias>`
    or `runs:/<id>/...`, from the version's description or the run's artifact; None if none."""
    client = MlflowClient(tracking_uri)
    text = None
    try:
        if match := re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@(.+))", model_uri):
            name, number, alias = match.groups()
            version = (
                client.get_model_version(name, number)
                if number
                else client.get_model_version_by_alias(name, alias)
            )
            text = version.description or _artifact_card(client, version.run_id)
        elif match := re.match(r"runs:/([^/]+)", model_uri):
            text = _artifact_card(client, match.group(1))
    except (MlflowException, OSError):
        return None
    for line in (text or "").splitlines():
        if line.startswith("> "):
            return line[2:].strip()
    return None


def _artifact_card(client: MlflowClient, run_id: str | None) -> str | None:
    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as folder, contextlib.suppress(MlflowException, OSError):
        return Path(client.download_artifacts(run_id, CARD, folder)).read_text()
    return None
