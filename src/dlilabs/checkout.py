"""Getting a run's code and data in place for `dlilabs.reproduce` (a helper, not a command).

Here: `code_problems` and `data_problems` say why the working tree is not the run's commit
(dvc.lock, .dvc and .gitignore files aside: NOT_CODE) or a prepared split's content is not the
run's ([] when both are: reproduce then trains here). Elsewhere: `worktree` checks the commit
out into a temporary git worktree and `restore_data` puts the run's splits there by their DVC
md5, from the DVC cache (`dvc checkout`) or else the remote (`dvc pull`).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from dlilabs.ground.errors import UserError

NOT_CODE = ("dvc.lock", ".dvc", ".gitignore")  # data pointers: the data is checked by content


def git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`git *args` in `root`, output captured as text; CalledProcessError if `check` fails."""
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=check)


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`dvc *args` (this interpreter's DVC) in `root`, like `git`."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, check=check
    )


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
