"""Entry points of the stages: `stage_main` turns a plain `task(cfg)` into a Hydra app.

Top layer: it composes `conf/config.yaml` from the project the command runs in (so a DVC
experiment folder's edited copy of `conf/` is the one used), prints a `UserError` (or a
lost tracking server) as one `error:` line with exit code 2, and ends an unfinished sweep's
parent run when a sweep stops early.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from dlilabs.config import config_dir
from dlilabs.errors import UserError
from dlilabs.tracking import close_unfinished_parent, tracking_user_error

log = logging.getLogger("dlilabs")


def stage_main(task: Callable[[DictConfig], object]) -> Callable[[], None]:
    """Turn `task(cfg)` into a Hydra entry point that prints UserErrors without a traceback."""

    @functools.wraps(task)
    def guarded(cfg: DictConfig) -> object:
        try:
            return task(cfg)
        except UserError as error:
            # stderr, not the log: Hydra's console log goes to stdout, errors should not.
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as interrupt:
            log.error("interrupted (%s); the MLflow run, if any, is marked KILLED", interrupt)
            sys.exit(130)
        except Exception as error:
            # A tracking server that went away is the user's to fix, like a config mistake.
            user_error = tracking_user_error(error)
            if user_error is None:
                raise
            print(f"error: {user_error}", file=sys.stderr)
            sys.exit(2)

    hydra_entry = hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")(
        guarded
    )

    @functools.wraps(task)
    def entry() -> None:
        try:
            hydra_entry()
        except BaseException as error:  # a failed job or Ctrl-C ends a sweep early
            close_unfinished_parent("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise

    return entry
