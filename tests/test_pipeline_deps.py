"""dvc.yaml's deps cover what each stage runs and what it composes: derived here, not listed.

For every stage DVC resolves from dvc.yaml and params.yaml, the code is the import graph of
the stage's module within dlilabs (grimp, as import-linter builds it: imports inside
functions included), and the config is what Hydra composes for the stage's command:
conf/config.yaml plus the file of every group choice (`hydra.runtime.choices`). Each of those
files must lie at or under one of the stage's deps, except what dvc.yaml's header leaves out
on purpose (LEFT_OUT below, with the same reasons). A miss names the stage and the path.
The real `dvc status` after such an edit: tests/test_pipeline.py."""

from __future__ import annotations

import functools
import importlib.util
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import REPO

# Modules (and their submodules) that cannot change a stage's output.
LEFT_OUT_MODULES = {
    "dlilabs.tracking": "where and how a run is recorded in MLflow, not what it computes",
}
# Config groups that cannot change a stage's output; per stage, or "*" for every stage.
LEFT_OUT_GROUPS = {
    "*": {"tracking"},  # the MLflow store and its settings, like dlilabs.tracking
    # The data stages compose the one config every stage does, but build and train no model.
    "download": {"model", "augment", "trainer"},
    "preprocess": {"model", "augment", "trainer"},
}


@functools.cache
def import_graph():
    import grimp

    return grimp.build_graph("dlilabs")


def module_file(module: str) -> str:
    """The source file of `module`, relative to the project root."""
    origin = importlib.util.find_spec(module).origin
    return Path(origin).resolve().relative_to(REPO).as_posix()


def code_files(module: str) -> set[str]:
    """`module` and every dlilabs module it imports, directly or not, as files; less
    LEFT_OUT_MODULES."""
    modules = {module, *import_graph().find_upstream_modules(module)}
    kept = {
        name
        for name in modules
        if not any(name == out or name.startswith(out + ".") for out in LEFT_OUT_MODULES)
    }
    return {module_file(name) for name in kept}


def config_files(overrides: list[str], stage: str) -> set[str]:
    """The files of conf/ that Hydra composes for `overrides`, as the stage's command does;
    less LEFT_OUT_GROUPS. Groups whose option is not a file of conf/ (Hydra's own launcher
    and sweeper, structured configs) are code, found by `code_files`."""
    from hydra import compose, initialize_config_dir

    import dlilabs.ground.config  # noqa: F401 (its resolvers and config schemas)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides, return_hydra_config=True)
    left_out = LEFT_OUT_GROUPS["*"] | LEFT_OUT_GROUPS.get(stage, set())
    files = {"conf/config.yaml"}
    for group, choice in cfg.hydra.runtime.choices.items():
        path = Path("conf", group, f"{choice}.yaml")
        if choice is not None and group.split("/")[0] not in left_out and (REPO / path).is_file():
            files.add(path.as_posix())
    return files


def resolved_stages(root: Path) -> list[tuple[str, str, list[str]]]:
    """(name, command, file deps) of every stage of the DVC project at `root`, as DVC itself
    resolves dvc.yaml's foreach and ${...} with params.yaml."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [
            (
                stage.name,  # train@asl_cnn (addressing adds the path off the cwd)
                stage.cmd,
                [dep.def_path for dep in stage.deps if not isinstance(dep, ParamsDependency)],
            )
            for stage in repo.index.stages
        ]


def uncovered(root: Path) -> list[str]:
    """One line `<stage>: <path> (...)` for each file a stage of `root` runs or composes
    that none of its deps covers (the path itself or a folder above it)."""
    missing = []
    for name, cmd, deps in resolved_stages(root):
        words = shlex.split(cmd)
        assert words[:2] == ["python", "-m"], f"{name}: not a `python -m` stage: {cmd}"
        module, overrides = words[2], words[3:]
        kind = name.split("@")[0]
        needed = {path: "imported" for path in code_files(module)}
        needed |= {path: "composed" for path in config_files(overrides, kind)}
        for path, why in sorted(needed.items()):
            if not any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps):
                missing.append(f"{name}: {path} ({why}, not in its deps)")
    return missing


def test_every_stage_depends_on_the_code_it_runs_and_the_config_it_composes():
    assert uncovered(REPO) == []


def test_a_dep_left_out_is_named_with_its_stage(tmp_path):
    """The check itself: dvc.yaml without core/models.py in train and without the profile
    file in evaluate."""
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True).close()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    lines = (REPO / "dvc.yaml").read_text().splitlines(keepends=True)
    section = ""
    kept = []
    for line in lines:
        if line.startswith("  ") and not line.startswith("   ") and line.strip().endswith(":"):
            section = line.strip().rstrip(":")
        dropped = (section, line.strip()) in {
            ("train", "- src/dlilabs/core/models.py"),
            ("evaluate", "- conf/profile/${profile}.yaml"),
        }
        if not dropped:
            kept.append(line)
    (tmp_path / "dvc.yaml").write_text("".join(kept))

    missing = uncovered(tmp_path)

    labs = [name.split("@")[1] for name, _, _ in resolved_stages(REPO) if name.startswith("train@")]
    assert labs, "dvc.yaml has no train stages"
    assert sorted(missing) == sorted(
        [f"train@{lab}: src/dlilabs/core/models.py (imported, not in its deps)" for lab in labs]
        + [f"evaluate@{lab}: conf/profile/full.yaml (composed, not in its deps)" for lab in labs]
    )


@pytest.mark.parametrize(
    "module, expected",
    [
        ("dlilabs.train", "src/dlilabs/core/models.py"),  # imported inside a function
        ("dlilabs.preprocess", "src/dlilabs/ground/schemas.py"),  # through entry -> ground
    ],
)
def test_the_import_graph_follows_imports_inside_functions_and_through_modules(module, expected):
    assert expected in code_files(module)
    assert not any(path.startswith("src/dlilabs/tracking/") for path in code_files(module))
