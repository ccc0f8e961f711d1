"""Finding and installing verified copies of a dataset's files on this machine.

Used by the download stage (dlilabs.download), which decides the search order. A copy is a
Candidate: where it is (a path, or `zip path:member`) and a function writing it to a path.
Copies are found in the user's `dataset.source.local` (a file, a zip holding the files or a
folder holding either, at any depth) and in the search folders (the downloads folder, other
tools' caches); zip members are found in any sub-folder. `install` writes the first candidate
whose sha256 is accepted (or, with accept_unverified, the first one, marked unverified) and
returns its Record.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from dlilabs.ground.errors import UserError
from dlilabs.ground.io import atomic_path, sha256_file

log = logging.getLogger("dlilabs.download")  # the stage's log: its lines read as one story

ACCEPT_HINT = (
    "if you trust this copy (another mirror's, a re-packed file), accept it deliberately with "
    "`dataset.source.accept_unverified=true` (under dvc repro: `DLILABS_ACCEPT_UNVERIFIED=1 "
    "dvc repro`); it is then recorded as unverified (provenance.json, run tag data.verified)"
)

Candidate = tuple[str, Callable[[Path], None]]  # (where a copy is, function writing it to a path)
Record = dict  # {"sha256": str, "source": str, "verified": bool}: one installed file


class ChecksumError(UserError):
    """A file's sha256 is none of the accepted ones (the bad copy has been deleted)."""


def install(
    target: Path, accepted: list[str], candidates: list[Candidate], user=False, accept=False
):
    """Write the first candidate whose sha256 is accepted to `target`; return its record.

    A wrong copy never reaches `target` (the error is raised inside atomic_path, which deletes
    the temporary), unless `accept` (accept_unverified, for the user's own files): then the
    first wrong one is installed, marked unverified. Else the first ChecksumError is raised."""
    errors = []
    for origin, write in candidates:
        try:
            with atomic_path(target) as temporary:
                write(temporary)
                if (digest := sha256_file(temporary)) not in accepted:
                    raise ChecksumError(
                        f"{target.name} from {origin}: checksum mismatch, expected sha256 "
                        f"{' or '.join(accepted)}, found {digest}; "
                        + (f"not used: {ACCEPT_HINT}" if user else "the bad copy was deleted")
                    )
        except ChecksumError as error:
            errors.append((error, origin, write))
            continue
        log.info("%s: sha256 %s, verified (from %s)", target.name, digest, origin)
        return {"sha256": digest, "source": origin, "verified": True}
    if accept and errors:
        _, origin, write = errors[0]
        with atomic_path(target) as temporary:
            write(temporary)
            digest = sha256_file(temporary)
        log.warning(
            "%s: sha256 %s, UNVERIFIED, used because dataset.source.accept_unverified=true "
            "(from %s)", target.name, digest, origin,
        )  # fmt: skip
        return {"sha256": digest, "source": origin, "verified": False}
    raise errors[0][0]


def install_each(names, candidates, accepted, staging, user=False, accept=False):
    """Install every name from its candidates; return ({name: record}, [problem, ...])."""
    done, problems = {}, []
    for name in names:
        try:
            if not candidates.get(name):
                raise UserError(f"no {name} there")
            done[name] = install(staging / name, accepted[name], candidates[name], user, accept)
        except UserError as error:
            problems.append(str(error))
    return done, problems


def _copy_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, path: Path) -> None:
    with archive.open(member) as stream, open(path, "wb") as sink:
        shutil.copyfileobj(stream, sink, 1 << 20)


def zip_candidates(archive: zipfile.ZipFile, label: str, name: str) -> list[Candidate]:
    """Members called `name` in any sub-folder, shallowest first (Kaggle's zip holds each
    CSV twice: at the top and in a folder)."""
    found = [m for m in archive.infolist() if PurePosixPath(m.filename).name == name]
    found.sort(key=lambda m: m.filename.count("/"))
    return [(f"{label}:{m.filename}", functools.partial(_copy_member, archive, m)) for m in found]


def _candidates(path: Path, names, accepted, stack: contextlib.ExitStack):
    """{name: [Candidate]} found at `path`: a file (which a one-file dataset takes under any
    name), a zip, or a folder holding either at any depth (there only *.zip files are opened:
    an .npz is a zip too, but not a holder)."""
    files = [path] if path.is_file() else sorted(path.rglob("*"), key=lambda p: len(p.parts))
    files = [p for p in files if p.is_file()]
    zips = []
    for p in files:
        if p.name not in names and (p.suffix == ".zip" or p == path) and zipfile.is_zipfile(p):
            with contextlib.suppress(zipfile.BadZipFile, OSError):  # a broken zip holds nothing
                zips.append((str(p), stack.enter_context(zipfile.ZipFile(p))))
    return {
        name: [
            (str(p), functools.partial(shutil.copyfile, p))
            for p in files
            if p.name == name or (p == path and len(accepted) == 1)
        ]
        + [c for label, archive in zips for c in zip_candidates(archive, label, name)]
        for name in names
    }


def copy_local(path: Path, names, accepted: dict, staging: Path, accept=False) -> dict:
    """Copy or extract `names` from the user's `path` into `staging`; return {name: record}.

    `path` is one of the files, a zip holding them, or a folder holding either at any depth.
    A one-file dataset also takes the file under another name (its hash decides)."""
    where = f"dataset.source.local={path}"
    if not path.exists():
        raise UserError(f"{where}: no such file or folder")
    with contextlib.ExitStack() as stack:
        candidates = _candidates(path, names, accepted, stack)
        done, problems = install_each(names, candidates, accepted, staging, True, accept)
    if problems:
        hint = "give the file itself, a zip holding it, or a folder holding either"
        raise UserError(f"{where}: {'; '.join(problems)} ({hint})")
    return done


def search_folders(folders: list[Path], names, accepted, staging: Path, accept=False):
    """Look for `names` in `folders` (the downloads folder, other tools' caches); install the
    copies found with an accepted sha256 (or, with `accept`, the first found) into `staging`.
    Returns ({name: record}, [why a copy found was refused, ...])."""
    with contextlib.ExitStack() as stack:
        found = {name: [] for name in names}
        for folder in folders:
            if folder.is_dir():
                for name, candidates in _candidates(folder, names, accepted, stack).items():
                    found[name] += candidates
        present = [name for name in names if found[name]]
        return install_each(present, found, accepted, staging, True, accept)
