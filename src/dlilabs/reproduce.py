"""`python -m dlilabs.reproduce RUN_ID`: train a run again from its id, and compare.

    python -m dlilabs.reproduce 5a4f795dca95...              # here: same commit, same data
    python -m dlilabs.reproduce 5a4f795dca95... --worktree   # at the run's commit, data by DVC

Reads the run's Hydra overrides (tag `hydra.overrides`), git commit (`git.commit`) and data
(its dataset inputs: DVC path, md5, content digest; dlilabs.tracking.lineage). Without
`--worktree` it refuses, one `error:` line per difference and exit code 2, when tracked files
differ from the run's commit (dvc.lock, .dvc and .gitignore files aside: the data is checked
by content) or a prepared split's content differs from the run's. With `--worktree` it checks
the commit out into a temporary git worktree and restores the splits there by their DVC md5,
from the DVC cache (`dvc checkout`) or else the remote (`dvc pull`).

Then it runs the train stage, `python -m dlilabs.train <the run's overrides>`, into a new
MLflow run tagged `reproduces=<run id>` (outputs in a temporary folder: DVC's `models/` stay
as they are; no model version is registered unless `--register`) and prints params and
metrics side by side. Exit code 0 when every metric is exactly equal (cost metrics, `time/`,
`memory/`, `system/`, aside), 1 when some differ.

The checks and the worktree are dlilabs.checkout; this module replays, trains and compares.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dlilabs.checkout import NOT_CODE, code_problems, data_problems, restore_data, worktree
from dlilabs.ground.config import project_root
from dlilabs.ground.errors import UserError

COST = ("time/", "memory/", "system/")  # measured, not expected to match
SWEEP_ENV = (
    "DLILABS_PARENT_RUN_ID", "DLILABS_SWEEP_KEYS", "DLILABS_SWEEP_RANK", "DLILABS_SEARCH_STUDY",
    "DVC_STAGE",
)  # fmt: skip


def overrides_of(run: dict) -> list[str]:
    """The run's Hydra overrides, without those reproduce sets itself (outputs, registration)
    or that tie a job to its search (`sweep.trial`)."""
    recorded = run["tags"].get("hydra.overrides")
    if recorded is None:
        raise UserError(
            f"run {run['run_id']} has no hydra.overrides tag: it was made outside a Hydra app "
            "(a test, a notebook) or before dlilabs recorded them; re-run it from its "
            "config.yaml artifact by hand"
        )
    # A reproduction is no Optuna trial: without sweep.trial it reports to no study.
    keys = ("paths.", "tracking.register_models", "sweep.trial")
    return [o for o in json.loads(recorded) if not o.split("=", 1)[0].lstrip("+~").startswith(keys)]


def train(workdir: Path, overrides: list[str], env: dict[str, str]) -> dict:
    """Run the train stage in `workdir` with `overrides`, its outputs in a temporary folder;
    returns its run.json (the new run's id and summary)."""
    with tempfile.TemporaryDirectory(prefix="dlilabs-reproduce-out-") as out:
        command = [
            sys.executable, "-m", "dlilabs.train", *overrides,
            f"paths.model_dir={out}", f"paths.eval_dir={out}/eval",
        ]  # fmt: skip
        result = subprocess.run(command, cwd=workdir, env=env, check=False)
        if result.returncode:
            raise UserError(f"the train stage failed (exit code {result.returncode}): see above")
        return json.loads((Path(out) / "run.json").read_text())


def stage_env(root: Path, workdir: Path, uri: str, run_id: str, store_dir: str) -> dict:
    """The train stage's environment: the project (or worktree) at `workdir` and its code, the
    store of the original run, the `reproduces` tag, no sweep of ours."""
    from dlilabs.tracking.lineage import REPRODUCES_ENV

    env = {key: value for key, value in os.environ.items() if key not in SWEEP_ENV}
    env.update(
        DLILABS_ROOT=str(workdir),
        DLILABS_STORE_DIR=store_dir,
        MLFLOW_TRACKING_URI=uri,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        **{REPRODUCES_ENV: run_id},
    )
    if workdir != root:  # the worktree's code, not the installed checkout's
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(workdir / "src"), env.get("PYTHONPATH")])
        )
    return env


def compare(
    old: dict, new: dict, changed_by_us: set[str], show_all: bool
) -> tuple[list[str], bool]:
    """Params and metrics of the `old` and `new` runs side by side; (lines, all the same)."""
    lines, same = [], True
    width = 36

    def row(name: str, left, right, verdict: str) -> str:
        values = [
            ("—" if v is None else repr(v) if isinstance(v, float) else str(v))[:24]
            for v in (left, right)
        ]
        return f"  {name[:width]:<{width}} {values[0]:<25} {values[1]:<25} {verdict}"

    params = sorted(set(old["params"]) | set(new["params"]))
    lines.append(f"params ({len(params)}){'':<{width - 9}} {'original':<25} {'reproduction':<25}")
    shown = 0
    for key in params:
        left, right = old["params"].get(key), new["params"].get(key)
        if left == right and not show_all:
            continue
        verdict = (
            "same" if left == right else "set by reproduce" if key in changed_by_us else "DIFFERENT"
        )
        same = same and verdict != "DIFFERENT"
        lines.append(row(key, left, right, verdict))
        shown += 1
    if not show_all:
        lines.append(f"  ({len(params) - shown} the same; --all lists them)")

    metrics = sorted(set(old["metrics"]) | set(new["metrics"]))
    lines.append(f"metrics{'':<{width - 5}} {'original':<25} {'reproduction':<25}")
    equal = compared = 0
    for key in (k for k in metrics if not k.startswith(COST)):
        left, right = old["metrics"].get(key), new["metrics"].get(key)
        if right is None and key.startswith("eval/"):
            continue  # the evaluate stage's: counted below
        compared += 1
        verdict = "equal" if left == right else "DIFFERENT"
        equal += verdict == "equal"
        lines.append(row(key, left, right, verdict))
    evaluated = [k for k in metrics if k.startswith("eval/") and k not in new["metrics"]]
    if evaluated:
        lines.append(f"  ({len(evaluated)} eval/ metrics of the evaluate stage: not re-run)")
    cost = [k for k in metrics if k.startswith(COST)]
    if cost:
        lines.append("cost (measured, not expected to match)")
        lines += [row(k, old["metrics"].get(k), new["metrics"].get(k), "") for k in cost]
    same = same and equal == compared
    verdict = "exactly equal" if equal == compared else f"equal, {compared - equal} DIFFERENT"
    lines.append(f"result: {equal} of {compared} metrics {verdict}")
    return lines, same


def reproduce(args: argparse.Namespace) -> int:
    """Check, set up, train, compare (see the module doc). Returns the exit code."""
    from dlilabs import tracking
    from dlilabs.ground.config import compose

    root = project_root()
    cfg = compose()
    uri = args.tracking_uri or cfg.tracking.uri
    old = tracking.run_record(uri, args.run_id)
    overrides = overrides_of(old)
    commit = old["tags"].get("git.commit")
    if not commit:
        raise UserError(
            f"run {old['run_id']} has no git.commit tag: made outside git, its code unknown"
        )
    datasets = [
        d
        for d in old["datasets"]
        if d.get("context") in ("training", "validation") and d.get("md5")
    ]
    if not datasets:
        print(f"note: run {old['run_id']} logged no DVC dataset inputs: its data is not checked")
    changed = [f for f in old["tags"].get("git.changed", "").split() if not f.endswith(NOT_CODE)]
    if changed:
        print(
            f"note: the run was made with uncommitted changes ({', '.join(changed)}): "
            f"reproducing commit {commit[:12]} as committed"
        )
    extra = [] if args.register else ["tracking.register_models=false"]
    with contextlib.ExitStack() as stack:
        if args.worktree:
            workdir = stack.enter_context(worktree(root, commit))
            print(f"worktree at commit {commit[:12]}: {workdir}")
            if datasets:
                restore_data(root, workdir, datasets)
            problems = data_problems(workdir, datasets)
        else:
            workdir = root
            problems = code_problems(root, commit) + data_problems(root, datasets)
        if problems:
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            return 2
        command = " ".join(["python -m dlilabs.train", *overrides, *extra])
        print(f"reproducing run {old['run_id']} ({old['name']}): {command}")
        env = stage_env(root, workdir, uri, old["run_id"], str(cfg.paths.store_dir))
        summary = train(workdir, overrides + extra, env)
    tracking.tag_run(uri, summary["run_id"], "reproduces", old["run_id"])
    new = tracking.run_record(uri, summary["run_id"])
    print(
        f"\nrun {old['run_id']} ({old['name']}, commit {commit[:12]}) reproduced as run "
        f"{new['run_id']}, tagged reproduces={old['run_id']}\n"
    )
    lines, same = compare(old, new, {"tracking.register_models"} if extra else set(), args.all)
    print("\n".join(lines))
    return 0 if same else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlilabs.reproduce", description=__doc__.split("\n\n")[0].split(": ", 1)[1]
    )
    parser.add_argument("run_id", help="the MLflow run id of a train run")
    parser.add_argument(
        "--worktree",
        action="store_true",
        help="run at the run's commit in a temporary git worktree, its data restored by DVC",
    )
    parser.add_argument("--tracking-uri", help="MLflow store (default: the project's)")
    parser.add_argument("--register", action="store_true", help="register the new model version")
    parser.add_argument("--all", action="store_true", help="list the params that are the same too")
    args = parser.parse_args(argv)
    try:
        return reproduce(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from dlilabs.ground.startup import quiet_tensorflow_startup, run_command

    quiet_tensorflow_startup()  # the command's process only, not on import (tests call main)
    run_command(main)
