"""Lineage: which data, code and config a run used, recorded so that it can be found again.

The train stage logs its prepared splits as MLflow dataset inputs (contexts `training` and
`validation`): name `<dataset>/<split>`, a digest of the arrays' contents (dtype, shape and
bytes: the same on every machine, unlike the .npz file, whose zip entries carry the time they
were written), the tensor schema, the row count (the profile), and a `dvc` source naming the
DVC-tracked path, the file's DVC md5 (its cache key) and whether `dvc.lock` agrees, and the
raw download it came from (dlilabs.tracking.dvcdata reads those from the files and dvc.lock;
this module is the MLflow side). Evaluate logs what it scored the same way (context
`evaluation`; the store keeps one input per dataset and run, so a new entry appears only if
evaluate saw other data) and tags `eval.data.same`.

Tags from `lineage_tags`: `hydra.overrides` (the job's Hydra overrides, JSON: what
`dlilabs.reproduce` replays), `git.changed` (tracked files changed since the commit),
`data.verified` (the raw download's provenance.json), `model.parameters`,
`model.architecture` and, for a reproduction, `reproduces`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.data.dataset_source import DatasetSource
from omegaconf import DictConfig

from dlilabs.tracking.dvcdata import raw_verified, split_record
from dlilabs.tracking.store import retry_if_locked

REPRODUCES_ENV = "DLILABS_REPRODUCES"  # set by dlilabs.reproduce for the run it starts
CONTEXTS = {"train": "training", "val": "validation"}
EVALUATION = "evaluation"


class DvcSource(DatasetSource):
    """A dataset source in a DVC project: a SplitRecord's fields (path, md5, dvc_lock, ...).
    The MLflow UI shows it as source type `dvc` with these fields."""

    def __init__(self, fields: dict[str, Any]):
        self.fields = fields

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self) -> str:
        """The split's path (relative to the project root, as DVC names it)."""
        return self.fields["path"]

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> DvcSource:
        raise NotImplementedError("a dvc source is built from a SplitRecord")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.fields)

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DvcSource:
        return cls(dict(source_dict))


def mlflow_dataset(cfg: DictConfig, split: str):
    """The split as an MLflow NumpyDataset: x uint8 (n, 28, 28) features, y (n,) targets,
    name `<dataset>/<split>`, our digest, a `dvc` source."""
    import mlflow

    record = split_record(cfg, split)
    with np.load(Path(cfg.paths.prepared_dir) / f"{split}.npz", allow_pickle=False) as data:
        features, targets = data["x"], data["y"]
    return mlflow.data.from_numpy(
        features,
        targets=targets,
        source=DvcSource(dataclasses.asdict(record)),
        name=f"{cfg.dataset.name}/{split}",
        digest=record.digest,
    )


RACED = ("UniqueViolation", "UNIQUE constraint failed", "duplicate key value")


def retry_if_raced(function, *args, attempts: int = 4, **kwargs):
    """Call an MLflow dataset logger, retrying when a parallel job (a sweep's) inserted the same
    dataset row between MLflow's lookup and its insert: the store then refuses the duplicate
    key, and the next try finds that row and only links it to this run."""
    for attempt in range(attempts):
        try:
            return retry_if_locked(function, *args, **kwargs)
        except Exception as error:
            if attempt == attempts - 1 or not any(text in str(error) for text in RACED):
                raise
            time.sleep(0.1 * (attempt + 1))
    return None


def log_datasets(cfg: DictConfig) -> None:
    """Log the train and validation splits as inputs of the active run."""
    import mlflow

    for split, context in CONTEXTS.items():
        retry_if_raced(mlflow.log_input, mlflow_dataset(cfg, split), context=context)


def log_eval_datasets(client, run_id: str, cfg: DictConfig) -> bool | None:
    """Log the splits evaluate scored as inputs of `run_id` (context `evaluation`, through
    `client`: the run's status is untouched) and tag `eval.data.same`. Returns True when they
    are the data the run trained and validated on, None when the run logged none (older)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    trained = {
        d["name"]: d["digest"]
        for d in run_datasets(client.get_run(run_id))
        if d["context"] in CONTEXTS.values()
    }
    inputs, same = [], bool(trained) or None
    for split in CONTEXTS:
        dataset = mlflow_dataset(cfg, split)
        same = same and trained.get(dataset.name) == dataset.digest
        tags = [InputTag("mlflow.data.context", EVALUATION)]
        inputs.append(DatasetInput(Dataset(**dataset.to_dict()), tags))
    retry_if_raced(client.log_inputs, run_id, datasets=inputs)
    verdict = "unknown" if same is None else str(same).lower()
    retry_if_locked(client.set_tag, run_id, "eval.data.same", verdict)
    return same


def run_datasets(run) -> list[dict]:
    """A run's dataset inputs as dicts: name, digest, context, rows, and the source's fields
    (path, md5, sha256, dvc_lock, stage, raw) when it is a `dvc` source."""
    found = []
    for item in run.inputs.dataset_inputs if run.inputs else []:
        dataset = item.dataset
        tags = {tag.key: tag.value for tag in item.tags}
        try:
            source = json.loads(dataset.source) if dataset.source_type == "dvc" else {}
            rows = (json.loads(dataset.profile or "{}").get("features_shape") or [None])[0]
        except ValueError:
            source, rows = {}, None
        found.append(
            {
                "name": dataset.name,
                "digest": dataset.digest,
                "context": tags.get("mlflow.data.context"),
                "rows": rows,
                **source,
            }
        )
    return found


def hydra_overrides() -> list[str] | None:
    """The running Hydra job's overrides (a sweep job's own), None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def changed_files(root: Path) -> list[str]:
    """Tracked files that differ from the commit (git status), [] outside git."""
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in status.splitlines() if line.strip()]


def architecture(model) -> str:
    """A Keras model's layers in one line: "Scale 1/255 → Flatten → Dense 512 relu → Dense 10
    softmax" (Scale 1/255: the layer that takes raw pixels, dlilabs.core.models.scale_pixels)."""
    from dlilabs.core.models import SCALE_LAYER

    parts = []
    for layer in model.layers:
        if layer.name == SCALE_LAYER:
            parts.append("Scale 1/255")
            continue
        config, kind = layer.get_config(), type(layer).__name__
        detail = [
            str(config[key]) for key in ("units", "filters", "rate") if config.get(key) is not None
        ]
        if config.get("kernel_size"):
            detail.append("x".join(str(size) for size in config["kernel_size"]))
        if config.get("activation") not in (None, "linear"):
            detail.append(str(config["activation"]))
        parts.append(" ".join([kind.replace("Normalization", "Norm"), *detail]))
    return " → ".join(parts)


def lineage_tags(cfg: DictConfig, model=None) -> dict[str, str]:
    """Tags for a train run: hydra.overrides, git.changed, data.verified, the model's size
    and layers (`model`: the Keras model), reproduces (inside dlilabs.reproduce)."""
    tags: dict[str, str] = {}
    overrides = hydra_overrides()
    if overrides is not None:
        tags["hydra.overrides"] = json.dumps(overrides)
    changed = changed_files(Path(cfg.paths.root))
    if changed:
        tags["git.changed"] = " ".join(changed[:20]) + (" ..." if len(changed) > 20 else "")
    verified = raw_verified(Path(cfg.paths.raw_dir))
    if verified is not None:
        tags["data.verified"] = str(verified).lower()
    if model is not None:
        tags["model.parameters"] = str(model.count_params())
        tags["model.architecture"] = architecture(model)[:5000]
    if os.environ.get(REPRODUCES_ENV):
        tags["reproduces"] = os.environ[REPRODUCES_ENV]
    return tags


def run_record(uri: str, run_id: str) -> dict:
    """What `dlilabs.reproduce` needs of run `run_id` in store `uri`: name, status, params,
    metrics (latest values), tags and datasets (`run_datasets`). UserError if there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dlilabs.ground.errors import UserError
    from dlilabs.tracking.registry import store_exists

    if not store_exists(uri):
        raise UserError(f"no MLflow store at {uri}: run the pipeline first or pass --tracking-uri")
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise UserError(
            f"no run {run_id!r} in {uri}: copy a run id from the MLflow UI, or pass the store "
            "it is in (--tracking-uri)"
        ) from None
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": dict(run.data.tags),
        "datasets": run_datasets(run),
    }


def tag_run(uri: str, run_id: str, key: str, value: str) -> None:
    """Set tag `key` of run `run_id` in store `uri` (through the client: status untouched)."""
    from mlflow import MlflowClient

    retry_if_locked(MlflowClient(uri).set_tag, run_id, key, value)
