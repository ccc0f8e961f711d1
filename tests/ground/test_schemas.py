"""Config mistakes are caught at the door: Hydra checks types against dlilabs.ground.schemas while
composing, `check_config` checks values before any data is loaded, and each mistake is one
`error:` line naming the key (exit 2), with no run or model version left in MLflow."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from dlilabs.entry import config_error_line, keras_knows
from dlilabs.ground.config import compose
from dlilabs.ground.errors import UserError
from dlilabs.ground.schemas import LOSSES, MONITORS, OPTIMIZERS, check_config

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(path.stem for path in (REPO / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_passes_the_checks(experiment):
    cfg = compose([f"experiment={experiment}"])
    check_config(cfg, keras_knows)
    assert isinstance(cfg.trainer.epochs, int) and cfg.trainer.epochs >= 1
    assert cfg.trainer.monitor in MONITORS[cfg.dataset.task]


@pytest.mark.parametrize(
    ("override", "key", "allowed"),
    [
        ("trainer.batch_size=0", "trainer.batch_size=0", ">= 1"),
        ("trainer.epochs=0", "trainer.epochs=0", ">= 1"),
        ("trainer.loss=foo", "trainer.loss='foo'", "categorical_crossentropy"),
        ("trainer.monitor=val_acc", "trainer.monitor='val_acc'", "val_accuracy, val_loss"),
        ("trainer.optimizer=adamz", "trainer.optimizer='adamz'", ", ".join(OPTIMIZERS)),
        ("trainer.learning_rate=0", "trainer.learning_rate=0.0", "> 0"),
        ("trainer.threads=0", "trainer.threads=0", "auto"),
        ("trainer.device=tpu", "trainer.device='tpu'", "gpu, cpu"),
        ("trainer.loss=sparse_categorical_crossentropy", "trainer.loss=", "one-hot"),
        ("model.hidden_units=[512,0]", "model.hidden_units[1]=0", ">= 1"),
    ],
)
def test_a_bad_value_names_the_key_the_value_and_what_is_allowed(override, key, allowed):
    cfg = compose([override])
    with pytest.raises(UserError) as caught:
        check_config(cfg, keras_knows)
    message = str(caught.value)
    assert key in message and allowed in message and "\n" not in message


def test_cnn_rates_and_sizes_are_checked():
    for override, key in (
        ("model.dropout=1.0", "model.dropout=1.0"),
        ("model.conv_blocks=[{filters: 0}]", "model.conv_blocks[0].filters=0"),
        ("model.conv_blocks=[{filters: 8, dropout: -0.1}]", "model.conv_blocks[0].dropout"),
    ):
        with pytest.raises(UserError, match=key.replace("[", r"\[").replace("]", r"\]")):
            check_config(compose(["experiment=asl_cnn", override]), keras_knows)
    # A block without a dropout has none, as in conf/model/cnn.yaml's first block.
    check_config(compose(["experiment=asl_cnn", "model.conv_blocks=[{filters: 8}]"]))


def test_the_line_fit_may_monitor_only_the_loss_it_logs():
    with pytest.raises(UserError, match="trainer.monitor='val_accuracy'.*use one of loss$"):
        check_config(compose(["experiment=line_fit", "trainer.monitor=val_accuracy"]))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.epochs=abc", "trainer.epochs=abc"),
        ("trainer.epochs=1.5", "trainer.epochs=1.5"),
        ("trainer.deterministic=maybe", "trainer.deterministic=maybe"),
        ("model.hidden_units=[a]", "model.hidden_units=[a]"),
        ("augment=dli", None),  # composes: the control case
    ],
)
def test_hydra_checks_types_against_the_schemas(override, key):
    if key is None:
        assert compose([override]).augment.zoom == pytest.approx(0.1)
        return
    with pytest.raises(ConfigCompositionException) as caught:
        compose([override])
    line = config_error_line(caught.value)
    assert key in line
    assert "could not be converted" in line or "not a valid bool" in line
    assert "\n" not in line


def test_unknown_options_and_keys_are_one_line_too():
    for override, expected in (
        ("model=foo", "Could not find 'model/foo'; Available options in 'model': cnn, linear, mlp"),
        ("trainer.epoch=3", "Could not override 'trainer.epoch'"),
    ):
        with pytest.raises(ConfigCompositionException) as caught:
            compose([override])
        line = config_error_line(caught.value)
        assert expected in line and "\n" not in line and "search path" not in line, line


def test_a_sparse_loss_is_refused_however_it_is_spelt():
    """The labels are one-hot: a sparse loss would fail deep inside Keras, after data loads."""
    with pytest.raises(UserError, match="one-hot"):
        check_config(compose(["trainer.loss=SparseCategoricalCrossentropy"]), keras_knows)


def test_keras_knows_every_name_the_lists_offer():
    """The lists are what the error messages offer: each must work in Keras as spelled."""
    import keras

    from dlilabs.core.fitting import make_optimizer

    for name in OPTIMIZERS:
        assert isinstance(make_optimizer(name, 1e-3), keras.optimizers.Optimizer), name
    for name in LOSSES:
        assert keras.losses.get(name) is not None, name
    # Keras' class names are taken too, by asking Keras; wrappers and unknowns are not.
    assert keras_knows("loss", "CategoricalCrossentropy")
    assert keras_knows("optimizer", "Adam") and keras_knows("optimizer", "RMSprop")
    assert not keras_knows("optimizer", "LossScaleOptimizer")
    assert not keras_knows("loss", "foo")


# The examples, each through the real train stage, all started at once (each process
# spends its few seconds importing TensorFlow). tiny_mnist: the data is there, so before the
# checks these trained and registered a model (epochs=0 an untrained one).
EXAMPLES = {
    "trainer.epochs=abc": "trainer.epochs",
    "trainer.batch_size=0": "trainer.batch_size",
    "trainer.loss=foo": "trainer.loss",
    "trainer.monitor=val_acc": "trainer.monitor",
    "trainer.epochs=0": "trainer.epochs",
}


def store_counts(root: Path) -> tuple[int, int]:
    """(runs, model versions) in the project's SQLite MLflow store; (0, 0) if there is none."""
    database = root / "mlflow.db"
    if not database.exists():
        return 0, 0
    with sqlite3.connect(database) as connection:
        tables = {row[0] for row in connection.execute("select name from sqlite_master")}
        return tuple(
            connection.execute(f"select count(*) from {table}").fetchone()[0]
            if table in tables
            else 0
            for table in ("runs", "model_versions")
        )


@pytest.mark.slow
def test_each_config_mistake_is_one_error_line_and_no_run(project, tiny_mnist):
    from conftest import stage_env

    processes = {
        override: subprocess.Popen(
            [sys.executable, "-m", "dlilabs.train", override, "trainer.device=cpu"],
            env=stage_env(project),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for override in EXAMPLES
    }
    for override, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert process.returncode == 2, (override, stderr)
        assert len(errors) == 1 and EXAMPLES[override] in errors[0], (override, stderr)
        assert override.split("=")[1] in errors[0], (override, errors)
        assert "Traceback" not in stderr, (override, stderr)
    assert store_counts(project) == (0, 0)
    assert not (project / "models").exists()
