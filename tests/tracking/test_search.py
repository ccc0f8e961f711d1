"""Hyperparameter search: the Optuna sweeper, its stored study, pruning, the objective."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import optuna
import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from conftest import make_images, stage_env
from dlilabs.ground.errors import UserError
from dlilabs.tracking.search import redacted, search_space
from dlilabs.tracking.trial import objective_value

# A search whose outcome is known in advance: every learning rate once (brute force, seeded
# order), and a pruner that stops any trial below 0.6 validation accuracy after an epoch.
# On the synthetic digits the small rates reach 1.0 at epoch 1 and 10.0 stays near 0.4.
PRUNING_SEARCH = """\
# @package _global_
defaults:
  - override /hydra/sweeper: optuna
  - override /hydra/sweeper/sampler: brute_force
  - override /hydra/sweeper/pruner: threshold
optimized_metric: best/val/accuracy
sweep:
  metric: search/objective
hydra:
  mode: MULTIRUN
  sweeper:
    study_name: lr_search
    n_trials: 3
    pruner:
      lower: 0.6
    params:
      trainer.learning_rate: choice(0.001, 0.003, 0.01, 10.0)
"""
TINY = ["experiment=mnist_mlp", "trainer.epochs=2", "model.hidden_units=[32]"]


def test_search_space_reads_hydras_override_grammar():
    space, fixed = search_space(
        [
            "experiment=asl_cnn",
            "model.dropout=interval(0.1, 0.5)",
            "trainer.learning_rate=tag(log, interval(1e-4, 1e-2))",
            "trainer.optimizer=choice(adam, sgd)",
            "model.dense_units=range(64, 257, 64)",
            "model.hidden_units=choice([64], [64,64])",
            "trainer.epochs=interval(1, 9)",
            "trainer.epochs=3",  # fixed on the command line: no longer searched
        ]
    )
    assert fixed == ["experiment=asl_cnn", "trainer.epochs=3"]
    assert "trainer.epochs" not in space
    dropout, rate = space["model.dropout"], space["trainer.learning_rate"]
    assert (dropout.low, dropout.high, dropout.log) == (0.1, 0.5, False)
    assert (rate.low, rate.high, rate.log) == (1e-4, 1e-2, True)
    assert space["trainer.optimizer"].choices == ("adam", "sgd")
    units = space["model.dense_units"]
    assert (units.low, units.high, units.step) == (64, 256, 64)  # range's end is excluded
    assert space["model.hidden_units"].choices == ("[64]", "[64,64]")  # read back as lists


def test_objective_minimises_the_gap_above_a_validation_floor():
    floor = OmegaConf.create({"metric": "best/val/accuracy", "min": 0.9, "penalty": 1.0})
    good = {"best_epoch/gap/accuracy": 0.05, "best/val/accuracy": 0.95}
    low = {"best_epoch/gap/accuracy": 0.0, "best/val/accuracy": 0.5}
    lower = {"best_epoch/gap/accuracy": 0.0, "best/val/accuracy": 0.3}
    gap = "best_epoch/gap/accuracy"
    assert objective_value(good, gap, "min", floor) == pytest.approx(0.05)
    # Below the floor: worse than any gap, and worse the further below.
    assert objective_value(low, gap, "min", floor) == pytest.approx(1.4)
    assert objective_value(lower, gap, "min", floor) > objective_value(low, gap, "min", floor)
    assert objective_value(good, "best/val/accuracy", "max", None) == pytest.approx(0.95)
    with pytest.raises(UserError, match="'val/acc' is not a result: best/val/accuracy"):
        objective_value(good, "val/acc", "max", None)


def test_storage_urls_lose_their_password():
    assert redacted("postgresql://mlflow:s3cret@db:5432/optuna") == (
        "postgresql://mlflow:***@db:5432/optuna"
    )
    assert redacted("sqlite:////srv/p/optuna.db") == "sqlite:////srv/p/optuna.db"


def test_search_config_stores_the_study_beside_mlflow(project):
    from hydra import compose, initialize_config_dir

    from dlilabs.ground.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "config",
            ["experiment=asl_cnn", "hparams_search=asl_cnn_optuna", "trainer.seed=7"],
            return_hydra_config=True,
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.startswith("hydra_plugins.")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 7
    assert sweeper.storage == f"sqlite:///{cfg.paths.store_dir}/optuna.db"
    assert cfg.tracking.uri == f"sqlite:///{cfg.paths.store_dir}/mlflow.db"
    assert set(sweeper.params) == {
        "model.dropout",
        "trainer.learning_rate",
        "trainer.optimizer",
        "model.dense_units",
    }
    assert cfg.optimized_metric == "best/val/accuracy" and cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.pruner._target_ == "optuna.pruners.MedianPruner"

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        gap = compose(
            "config",
            ["experiment=asl_cnn_aug", "hparams_search=asl_cnn_gap_optuna"],
            return_hydra_config=True,
        )
    assert gap.optimized_metric == "best_epoch/gap/accuracy" and gap.sweep.goal == "min"
    assert gap.sweep.floor.metric == "best/val/accuracy" and gap.sweep.floor.min == 0.9
    assert gap.hydra.sweeper.pruner._target_ == "optuna.pruners.NopPruner"


def test_pruning_callback_stops_training_on_the_pruners_word():
    """Real Keras fits reporting to real Optuna trials: a pruner that prunes everything
    stops the fit after its first epoch; one that prunes nothing lets it run."""
    import keras

    from dlilabs.core.fitting import fit
    from dlilabs.core.pruning import TrialPruning

    images, labels = make_images(64, 10)
    x = images[..., None].astype(np.float32) / 255.0
    y = keras.utils.to_categorical(labels, 10)
    data = (x, y)
    outcomes = {}
    for name, lower in (("hopeless", 2.0), ("fine", 0.0)):
        study = optuna.create_study(
            direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower)
        )
        trial = study.ask()
        model = keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                keras.layers.Flatten(),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )
        model.compile("adam", "categorical_crossentropy", metrics=["accuracy"])
        pruned: list[int] = []
        callback = TrialPruning(
            trial, "val_accuracy", lambda epoch, _, seen=pruned: seen.append(epoch)
        )
        rows, _ = fit(model, data_batches(data), data_batches(data), 3, "val_accuracy", [callback])
        outcomes[name] = (
            len(rows),
            callback.pruned_at,
            pruned,
            study.trials[0].intermediate_values,
        )
    assert outcomes["hopeless"][:3] == (1, 1, [1])
    assert list(outcomes["hopeless"][3]) == [1]
    assert outcomes["fine"][:3] == (3, None, [])
    assert list(outcomes["fine"][3]) == [1, 2, 3]  # one report per epoch, step = epoch


def data_batches(data):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(data).batch(16)


def search(project, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "dlilabs.train", *TINY, "hparams_search=lr_search", *overrides],
        env=stage_env(project),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_search_prunes_the_hopeless_trial_and_a_second_search_continues_the_study(
    project, tiny_mnist
):
    (project / "conf" / "hparams_search" / "lr_search.yaml").write_text(PRUNING_SEARCH)
    first = search(project)
    second = search(project, "hydra.sweeper.n_trials=1")
    assert "continued after 3 trials" in second.stdout + second.stderr

    # The study, beside mlflow.db: four trials, every rate once (continued, not restarted).
    study = optuna.load_study(study_name="lr_search", storage=f"sqlite:///{project}/optuna.db")
    trials = {trial.params["trainer.learning_rate"]: trial for trial in study.trials}
    assert sorted(trials) == [0.001, 0.003, 0.01, 10.0]
    assert trials[10.0].state.name == "PRUNED"
    assert list(trials[10.0].intermediate_values) == [1]  # stopped after its first epoch
    assert {trials[rate].state.name for rate in (0.001, 0.003, 0.01)} == {"COMPLETE"}

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment_id = client.get_experiment_by_name("dlilabs").experiment_id
    runs = client.search_runs([experiment_id])
    parents = sorted(
        (run for run in runs if run.data.tags.get("sweep") == "parent"),
        key=lambda run: run.info.start_time,
    )
    children = [run for run in runs if run.data.tags.get("sweep") == "child"]
    assert len(parents) == 2 and len(children) == 4
    assert {run.info.status for run in runs} == {"FINISHED"}  # pruned is not FAILED
    per_parent = [run.data.tags["mlflow.parentRunId"] for run in children]
    assert sorted(per_parent.count(parent.info.run_id) for parent in parents) == [1, 3]

    by_trial = {int(run.data.tags["search.trial"]): run for run in children}
    pruned = by_trial[trials[10.0].number]
    assert pruned.data.tags["pruned"] == "true" and pruned.data.tags["pruned_at_epoch"] == "1"
    assert len(client.get_metric_history(pruned.info.run_id, "val/accuracy")) == 1
    assert "search/objective" not in pruned.data.metrics  # a partial run is nobody's best
    assert (
        pruned.info.run_name == f"mnist_mlp trial {trials[10.0].number} trainer.learning_rate=10.0"
    )
    for rate in (0.001, 0.003, 0.01):
        run = by_trial[trials[rate].number]
        assert "pruned" not in run.data.tags
        assert len(client.get_metric_history(run.info.run_id, "val/accuracy")) == 2
        assert run.data.metrics["search/objective"] == pytest.approx(trials[rate].value)
        assert trials[rate].value == pytest.approx(run.data.metrics["best/val/accuracy"])

    # The first parent: the search space and settings as params, the best trial named.
    parent = parents[0]
    params = parent.data.params
    assert params["search.space.trainer.learning_rate"] == "choice(0.001, 0.003, 0.01, 10.0)"
    assert params["search.sampler"].startswith("BruteForceSampler(seed=42")
    assert params["search.pruner"].startswith("ThresholdPruner(lower=0.6")
    assert params["search.objective"] == "best/val/accuracy"
    assert params["search.study"] == "lr_search" and params["search.storage"].endswith("optuna.db")
    first_trials = [t for t in study.trials if t.number < 3]
    first_best = max((t for t in first_trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert parent.data.metrics["search/trials_pruned"] == sum(
        t.state.name == "PRUNED" for t in first_trials
    )
    assert float(parent.data.tags["best_trial.value"]) == pytest.approx(first_best.value)
    assert parent.data.tags["best_child.run_id"] == parent.data.tags["best_trial.run_id"]
    assert "Best trial:" in first.stdout + first.stderr


@pytest.mark.slow
def test_a_search_with_nothing_to_search_is_one_error_line(project):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dlilabs.train",
            "-m",
            "experiment=mnist_mlp",
            "hydra/sweeper=optuna",
        ],
        env=stage_env(project),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "error: the Optuna sweeper has nothing to search" in result.stderr
    assert "Traceback" not in result.stderr
