"""Entry points of the stages: `stage_main` turns a plain `task(cfg)` into a Hydra app.

Top layer: when the command starts it quiets TensorFlow's start-up (`dlilabs.ground.startup`;
the stage modules load TensorFlow only after that), composes `conf/config.yaml` from the
project the command runs in (so a DVC experiment folder's edited copy of `conf/` is the one
used), checks the config's values before the task runs (`dlilabs.ground.schemas.check_config`:
before any data is loaded or run is opened), prints a config mistake Hydra finds while
composing (a value of the wrong type, an unknown option), a `UserError`, a lost tracking
server or a full disk as one `error:` line with exit code 2, and ends an unfinished sweep's
parent run when a sweep stops early.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator

import hydra
import hydra._internal.utils as hydra_internals
from hydra.errors import CompactHydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from dlilabs.ground.config import config_dir
from dlilabs.ground.errors import UserError
from dlilabs.ground.io import write_problem
from dlilabs.ground.schemas import OPTIMIZERS, check_config
from dlilabs.ground.startup import quiet_tensorflow_startup
from dlilabs.tracking import close_unfinished_parent, job_result, tracking_user_error

log = logging.getLogger("dlilabs")
# Lines of Hydra's and OmegaConf's reports that say where in their own code, not what is wrong.
NOISE = re.compile(r"\s*(object_type=|reference_type=)")


def keras_knows(kind: str, name: str) -> bool:
    """Whether Keras takes `name` as a loss ("loss") or as an optimizer class ("optimizer",
    e.g. `Adam` for `adam`), without creating one (no tensor before the device is chosen)."""
    import keras

    if kind == "optimizer":
        found = getattr(keras.optimizers, name, None)
        return isinstance(found, type) and name.lower() in OPTIMIZERS
    try:
        keras.losses.get(name)
    except (ValueError, TypeError):
        return False
    return True


def config_error_line(error: CompactHydraException) -> str:
    """Hydra's composition error (several lines, the option list tab-indented, the failing
    value's OmegaConf error as its cause) as one line naming the key, value and what fits."""
    text = str(error).split("\nConfig search path:")[0]
    text = re.sub(r"\w+ raised while composing config:\s*", "", text).replace("full_key:", "key")
    parts: list[str] = []
    for line in text.splitlines():
        if line.startswith("\t") and parts:  # "Available options in 'model':" then one a line
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line.strip()
        elif line.strip() and not NOISE.match(line):
            parts.append(line.strip().rstrip("."))
    message = "; ".join(parts).replace(":;", ":")
    if isinstance(error.__cause__, OmegaConfBaseException):
        detail = str(error.__cause__).strip().splitlines()[0]
        # "Error merging override trainer.epochs=abc" + "Value 'abc' ... to Integer"
        override = message.removeprefix("Error merging override ")
        message = f"{override}: {detail}" if override != message else f"{message} ({detail})"
    return message


@contextlib.contextmanager
def one_line_config_errors() -> Iterator[None]:
    """While Hydra composes and runs, print its config errors as one `error:` line, exit 2.

    Hydra prints these itself (several lines, exit 1) from `run_and_report`, which wraps
    composing and running; it is swapped here for one that reports them our way first.
    $HYDRA_FULL_ERROR=1 keeps Hydra's full report, for debugging."""
    hydra_report = hydra_internals.run_and_report

    def report(func: Callable[[], object]) -> object:
        def run() -> object:
            try:
                return func()
            except CompactHydraException as error:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                print(f"error: {config_error_line(error)}", file=sys.stderr)
                sys.exit(2)
            except UserError as error:  # raised by a sweeper (nothing to search, say)
                print(f"error: {error}", file=sys.stderr)
                sys.exit(2)

        return hydra_report(run)

    hydra_internals.run_and_report = report
    try:
        yield
    finally:
        hydra_internals.run_and_report = hydra_report


@contextlib.contextmanager
def sweep_configs_composed_once() -> Iterator[None]:
    """While Hydra runs, compose each sweep job's config once, not twice.

    Hydra's sweepers check a batch before launching it (`Sweeper.validate_batch_is_legal`,
    so that a bad combination fails before any job runs) by composing every job's config,
    then the launcher composes each again when it starts the job: ~0.25 s a job each time
    (a quarter of a sweep job's cost beyond its epochs). The check's configs, which it does
    not use, are kept for the launcher's call with the same master config and overrides (in
    this process: launchers that compose in their workers compose there as before)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.plugins.sweeper import Sweeper

    compose, validate = ConfigLoaderImpl.load_sweep_config, Sweeper.validate_batch_is_legal
    checked: dict[tuple, tuple[DictConfig, DictConfig]] = {}
    checking = []

    def load_sweep_config(self, master_config, sweep_overrides):
        key = (id(self), id(master_config), tuple(sweep_overrides))
        if not checking:
            found = checked.pop(key, None)
            if found is not None and found[0] is master_config:
                return found[1]
            return compose(self, master_config, sweep_overrides)
        config = compose(self, master_config, sweep_overrides)
        checked[key] = (master_config, config)
        return config

    def validate_batch_is_legal(self, batch):
        checked.clear()  # the last batch's, left by launchers that compose in their workers
        checking.append(True)
        try:
            return validate(self, batch)
        finally:
            checking.pop()

    ConfigLoaderImpl.load_sweep_config = load_sweep_config
    Sweeper.validate_batch_is_legal = validate_batch_is_legal
    try:
        yield
    finally:
        ConfigLoaderImpl.load_sweep_config = compose
        Sweeper.validate_batch_is_legal = validate
        checked.clear()


def stage_main(task: Callable[[DictConfig], object]) -> Callable[[], None]:
    """Turn `task(cfg)` into a Hydra entry point that prints UserErrors without a traceback."""

    @functools.wraps(task)
    def guarded(cfg: DictConfig) -> object:
        # A job a launcher runs in a process of its own (SLURM, joblib) starts here.
        quiet_tensorflow_startup()
        try:
            check_config(cfg, keras_knows)  # before any data is loaded or run opened
            # A sweeper that optimises (Optuna) gets the objective; others the results.
            return job_result(cfg, task(cfg))
        except UserError as error:
            # stderr, not the log: Hydra's console log goes to stdout, errors should not.
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as interrupt:
            log.error("interrupted (%s); the MLflow run, if any, is marked KILLED", interrupt)
            sys.exit(130)
        except Exception as error:
            # A tracking server that went away, or a write to a full disk or read-only folder
            # that no writer named (an MLflow artifact, say), is the user's to fix too.
            user_error = tracking_user_error(error) or write_problem(error)
            if user_error is None:
                raise
            print(f"error: {user_error}", file=sys.stderr)
            sys.exit(2)

    hydra_entry = hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(
        guarded
    )

    @functools.wraps(task)
    def entry() -> None:
        quiet_tensorflow_startup()  # the command's process only: not on `import dlilabs`
        try:
            with one_line_config_errors(), sweep_configs_composed_once():
                hydra_entry()
        except BaseException as error:  # a failed job or Ctrl-C ends a sweep early
            close_unfinished_parent("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise

    return entry
