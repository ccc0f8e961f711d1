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
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from dlilabs.config import project_root
from dlilabs.errors import UserError

COST = ("time/", "memory/", "system/")  # measured, not expected to match
NOT_CODE = ("dvc.lock", ".dvc", ".gitignore")  # data pointers: the data is checked by content
SWEEP_ENV = (
    "DLILABS_PARENT_RUN_ID", "DLILABS_SWEEP_KEYS", "DLILABS_SWEEP_RANK", "DLILABS_SEARCH_STUDY",
    "DVC_STAGE",
)  # fmt: skip


def git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=check)


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, check=check
    )


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


def code_problems(root: Path, commit: str) -> list[str]:
    """Why the working tree at `root` is not the code of `commit` ([] when it is)."""
    if git(root, "cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode:
        return [f"the run's commit {commit[:12]} is not in the git repository at {root}: fetch it"]
    changed = [
        name
        for name in git(root, "diff", "--name-only", commit, "--", ".").stdout.split()
        if not name.endswith(NOT_CODE)
    ]
    if not changed:
        return []
    head = git(root, "rev-parse", "HEAD").stdout.strip()[:12]
    shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
    return [
        f"the working tree (commit {head}) is not the run's commit {commit[:12]}: {shown} "
        f"differ{'s' if len(changed) == 1 else ''}; `git checkout {commit[:12]}`, or use --worktree"
    ]


def data_problems(root: Path, datasets: list[dict]) -> list[str]:
    """Why the prepared splits at `root` are not the run's ([] when they are, by content)."""
    from dlilabs.tracking import arrays_sha256

    problems = []
    for data in datasets:
        file = root / data["path"]
        if not file.is_file():
            problems.append(
                f"{data['path']} (the run's {data['name']}) is missing: `dvc pull` it, "
                "or use --worktree"
            )
        elif (here := arrays_sha256(file)) != data["sha256"]:
            problems.append(
                f"{data['path']} holds other data than the run's {data['name']} (digest "
                f"{here[:12]} here, {data['sha256'][:12]} in the run, DVC md5 {data['md5']}): "
                "restore it (`dvc checkout` with the dvc.lock that names that md5), or use "
                "--worktree"
            )
    return problems


@contextlib.contextmanager
def worktree(root: Path, commit: str) -> Iterator[Path]:
    """A temporary git worktree of the repository at `root`, at `commit`; yields the folder
    of the project inside it (the same path below the repository's top as `root`)."""
    prefix = git(root, "rev-parse", "--show-prefix").stdout.strip()
    folder = Path(tempfile.mkdtemp(prefix="dlilabs-reproduce-"))
    tree = folder / "tree"
    git(root, "worktree", "add", "--detach", "--quiet", str(tree), commit)
    try:
        yield tree / prefix
    finally:
        git(root, "worktree", "remove", "--force", str(tree), check=False)
        shutil.rmtree(folder, ignore_errors=True)
        git(root, "worktree", "prune", check=False)


def restore_data(root: Path, tree: Path, datasets: list[dict]) -> None:
    """Put each split of `datasets` at its path in `tree`, by its DVC md5: `dvc checkout` from
    the project's DVC cache, else `dvc pull` from the remote (one .dvc file per split)."""
    if not (tree / ".dvc").is_dir():
        raise UserError(f"the run's commit has no .dvc folder at {tree.name}: not a DVC project")
    local = root / ".dvc" / "config.local"  # remote credentials, if any
    if local.is_file():
        shutil.copy2(local, tree / ".dvc" / "config.local")
    cache = dvc(root, "cache", "dir").stdout.strip()
    dvc(tree, "cache", "dir", "--local", cache)
    staging = tree / "reproduce-data"
    staging.mkdir()
    targets = []
    for data in datasets:
        name = f"{data['context']}.npz"
        out = {"md5": data["md5"], "path": name, "hash": "md5"}
        (staging / f"{name}.dvc").write_text(yaml.safe_dump({"outs": [out]}))
        targets.append(f"reproduce-data/{name}.dvc")
    result = dvc(tree, "checkout", "--quiet", *targets, check=False)
    if result.returncode:
        result = dvc(tree, "pull", "--quiet", *targets, check=False)
    if result.returncode:
        md5s = ", ".join(data["md5"] for data in datasets)
        raise UserError(
            f"the run's data (DVC md5 {md5s}) is neither in the DVC cache {cache} nor on a "
            "DVC remote: `dvc push` it from a machine that has it"
        )
    for data in datasets:
        target = tree / data["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        (staging / f"{data['context']}.npz").replace(target)


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
    from dlilabs.config import compose

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
    sys.exit(main())
