"""Epoch checkpoints: a training stopped by a scheduler (SLURM's preemption or time limit,
`scontrol requeue`, `scancel`, a signal) continues from its last finished epoch.

Core layer (Keras and arrays, no MLflow). After every epoch `EpochCheckpoint` writes, into
one folder on the shared filesystem:

    variables-<epoch>.npz  every variable of the model (weights, the optimizer's slots and
                           step count, the random layers' seed states) and of the augmenter
    best-<epoch>.npz       the best epoch's weights (the model that is saved in the end)
    state.json             the epoch reached, the history rows so far, the best epoch's
                           value and number, the two files above, and what the caller adds
                           (`extra`: the MLflow run id, the data's digests)

Each file is written to a temporary name and renamed, state.json last: it names the files of
a complete checkpoint, so a stop in the middle of writing leaves the previous one whole.
The batches' order needs nothing saved: each epoch's batches come from
`data.make_dataset(epochs=range(e, e + 1))`, whose order depends on the seed and the epoch
alone. So a deterministic training that is interrupted and resumed ends with exactly the
numbers of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from dlilabs.ground.io import atomic_path, write_json

log = logging.getLogger("dlilabs.checkpoint")

STATE = "state.json"


@dataclass
class Plan:
    """Checkpointing for one `fitting.fit`: write into `folder` each epoch, with `extra` in
    state.json; continue from `resumed` if given. `augmenter`: the input pipeline's random
    layers, whose seed states go along (the in-model augmenter's are in the trained model)."""

    folder: Path
    resumed: Resumed | None = None
    extra: dict = field(default_factory=dict)
    augmenter: keras.Model | None = None

    @property
    def first_epoch(self) -> int:
        """Epochs already done (0 when starting afresh): fit from here."""
        return self.resumed.epoch if self.resumed else 0


@dataclass
class Resumed:
    """What a checkpoint holds: `epoch` epochs done (1-based count), their history `rows`,
    the best epoch so far (`best_value`, `best_epoch`) and `extra` (the caller's)."""

    folder: Path
    epoch: int
    rows: list[dict[str, float]]
    best_value: float | None
    best_epoch: int
    extra: dict = field(default_factory=dict)
    variables: str = ""
    best: str = ""


def _variables(model: keras.Model, augmenter: keras.Model | None) -> list:
    """Every variable a training changes: the model's (trainable, non-trainable and random
    seed states), its optimizer's, and the augmenter's seed states, in a fixed order."""
    found = [*model.variables, *model.optimizer.variables]
    if augmenter is not None:
        found += augmenter.variables
    return found


def _save_arrays(path: Path, arrays: list[np.ndarray]) -> None:
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        np.savez(stream, *arrays)


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as stored:
        return [stored[f"arr_{index}"] for index in range(len(stored.files))]


def load(folder: Path) -> Resumed | None:
    """The checkpoint in `folder`, or None when there is none (or only a partial one)."""
    state_file = Path(folder) / STATE
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
        return Resumed(
            Path(folder),
            int(state["epoch"]),
            list(state["rows"]),
            state.get("best_value"),
            int(state.get("best_epoch", 0)),
            dict(state.get("extra", {})),
            state["variables"],
            state.get("best", ""),
        )
    except (ValueError, KeyError, TypeError) as error:
        log.warning(
            "Ignoring the damaged checkpoint in %s (%s): training starts afresh", folder, error
        )
        return None


def restore(resumed: Resumed, model: keras.Model, augmenter: keras.Model | None) -> None:
    """Put the checkpoint's variables into the compiled `model` (and `augmenter`), building
    the optimizer's slots first so that they exist to be filled."""
    model.optimizer.build(model.trainable_variables)
    variables = _variables(model, augmenter)
    arrays = _load_arrays(resumed.folder / resumed.variables)
    shapes = [tuple(array.shape) for array in arrays]
    if shapes != [tuple(variable.shape) for variable in variables]:
        raise ValueError(f"the checkpoint in {resumed.folder} was written for another model")
    for variable, array in zip(variables, arrays, strict=True):
        variable.assign(array)


def best_weights(resumed: Resumed) -> list[np.ndarray] | None:
    """The best epoch's weights saved with the checkpoint (None if no epoch was best yet)."""
    return _load_arrays(resumed.folder / resumed.best) if resumed.best else None


def remove(folder: Path) -> None:
    """Delete a checkpoint (its run finished, or failed for a reason a restart won't fix)."""
    shutil.rmtree(folder, ignore_errors=True)


class EpochCheckpoint(keras.callbacks.Callback):
    """Writes the checkpoint into `folder` at the end of every epoch (see the module doc).

    `best` is fitting.KeepBestWeights (its state goes along), `rows` the list the history
    callback fills, `augmenter` the layers that augment inside the training step (or None).
    Register it after those two, so that the epoch's row and best weights are in."""

    def __init__(self, folder: Path, best, rows: list, augmenter=None, extra: dict | None = None):
        super().__init__()
        self.folder = Path(folder)
        self.best = best
        self.rows = rows
        self.augmenter = augmenter
        self.extra = dict(extra or {})
        self._saved_best_epoch = None

    def on_epoch_end(self, epoch, logs=None):
        self.folder.mkdir(parents=True, exist_ok=True)
        variables = f"variables-{epoch + 1}.npz"
        arrays = [np.asarray(variable) for variable in _variables(self.model, self.augmenter)]
        _save_arrays(self.folder / variables, arrays)
        best = f"best-{self.best.best_epoch}.npz" if self.best.best_weights is not None else ""
        if best and not (self.folder / best).is_file():
            _save_arrays(self.folder / best, self.best.best_weights)
        write_json(
            self.folder / STATE,
            {
                "epoch": epoch + 1,
                "rows": self.rows,
                "best_value": self.best.best_value,
                "best_epoch": self.best.best_epoch,
                "variables": variables,
                "best": best,
                "extra": self.extra,
            },
        )
        for stale in self.folder.glob("*.npz"):  # the previous epoch's, now replaced
            if stale.name not in (variables, best):
                stale.unlink(missing_ok=True)
