"""Download stage: put a dataset's raw files in `paths.raw_dir`, each verified by sha256.

`python -m dlilabs.download dataset=asl` reads `cfg.dataset.source`:

    local:   a file, a zip holding the files or a folder holding either; replaces search and
             mirrors
    search:  folders looked through before the network, in order: the project's downloads
             folder (`paths.downloads_dir`, $DLILABS_DOWNLOADS) and the caches of other tools
             (Keras' `~/.keras/datasets`, kagglehub's); each may hold the files or zips holding
             them, at any depth
    mirrors: tried in order, each {url} (the one file), {url, archive: zip} (a zip holding the
             files in any sub-folder) or {files: {name: url}} (one URL per file)
    files:   {name: [accepted sha256, ...]}
    accept_unverified: install a file of the user's (local or search) whose sha256 is none of
             the accepted ones, when no accepted copy is found; it is recorded as unverified
    manual:  what to put in the downloads folder, for the offline error message
    timeout: seconds to wait for a connection or between bytes; retries: extra tries per URL

A file already in place with an accepted hash is kept. Nothing is installed unless every file
is good: they are gathered in a staging folder beside raw_dir and moved in together. raw_dir
also gets `provenance.json`: {"verified": all verified, "files": {name: {sha256, source,
verified}}}, which says where each file came from (the log says it too, one line per file).
Downloads stream through pooch's HTTPDownloader (tqdm progress bar). Mirrors that send nothing
may cost GIVE_UP_AFTER_S seconds in all, so an offline run fails in under 10 s and says what
to do instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from omegaconf import DictConfig

from dlilabs import mirrors
from dlilabs.cli import stage_main
from dlilabs.errors import UserError
from dlilabs.io import atomic_path, read_json, sha256_file, write_json
from dlilabs.mirrors import Budget, FetchError

log = logging.getLogger("dlilabs.download")  # not "__main__" under `python -m`

GIVE_UP_AFTER_S = 8.0  # leaves ~2 s of the 10 s promise for starting Python and Hydra
PROVENANCE = "provenance.json"
ACCEPT_HINT = (
    "if you trust this copy (another mirror's, a re-packed file), accept it deliberately with "
    "`dataset.source.accept_unverified=true` (under dvc repro: `DLILABS_ACCEPT_UNVERIFIED=1 "
    "dvc repro`); it is then recorded as unverified (provenance.json, run tag data.verified)"
)

Candidate = tuple[str, Callable[[Path], None]]  # (where a copy is, function writing it to a path)
Record = dict  # {"sha256": str, "source": str, "verified": bool}: one installed file


class ChecksumError(UserError):
    """A file's sha256 is none of the accepted ones (the bad copy has been deleted)."""


def download(cfg: DictConfig, give_up_after: float = GIVE_UP_AFTER_S) -> dict[str, str]:
    """Materialise `cfg.dataset.source.files` in `cfg.paths.raw_dir` with its provenance.json;
    return {file name: sha256}.

    Raises UserError when the dataset has no source, the local copy is unusable, a hash is
    wrong or no copy was found (listing the places searched, each URL tried and the ways
    forward); raw_dir then holds no new file."""
    source = cfg.dataset.get("source")
    if source is None:
        raise UserError(f"dataset {cfg.dataset.name!r} has no `source`: nothing to download")
    accepted = {  # a lone hash written without brackets is a list of one
        name: [str(h).lower() for h in ([hashes] if isinstance(hashes, str) else hashes)]
        for name, hashes in source.files.items()
    }
    accept = str(source.get("accept_unverified", False)).lower() in ("true", "1", "yes")
    raw_dir = Path(cfg.paths.raw_dir)
    before = _read_provenance(raw_dir)
    done = {
        name: record
        for name in accepted
        if (record := _present(raw_dir / name, accepted[name], before.get(name), accept))
    }
    if missing := [name for name in accepted if name not in done]:
        raw_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=raw_dir.parent, prefix=f".{raw_dir.name}-") as tmp:
            got = _gather(cfg, missing, accepted, Path(tmp), accept, give_up_after)
            raw_dir.mkdir(exist_ok=True)
            for name in got:  # every file is good: only now does any reach raw_dir
                os.replace(Path(tmp) / name, raw_dir / name)
        done |= got
    files = {name: done[name] for name in accepted}
    if files != before or not (raw_dir / PROVENANCE).is_file():
        verified = all(record["verified"] for record in files.values())
        write_json(raw_dir / PROVENANCE, {"verified": verified, "files": files})
    return {name: record["sha256"] for name, record in files.items()}


def _read_provenance(raw_dir: Path) -> dict[str, Record]:
    """{name: record} from an earlier run's provenance.json ({} if none or unreadable)."""
    try:
        return dict(read_json(raw_dir / PROVENANCE)["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _present(path: Path, accepted: list[str], earlier: Record | None, accept: bool):
    """The record of `path` if it exists with an accepted hash (or one accepted unverified
    earlier, while accept_unverified still holds); a bad copy is deleted. None otherwise."""
    if not path.is_file():
        return None
    digest = sha256_file(path)
    same = earlier is not None and earlier.get("sha256") == digest
    if digest in accepted:
        log.info("%s: already present, verified (sha256 %s)", path.name, digest)
        source = earlier["source"] if same else "already present"
        return {"sha256": digest, "source": source, "verified": True}
    if accept and same:
        log.warning("%s: already present, UNVERIFIED (sha256 %s, accepted)", path.name, digest)
        return earlier
    log.warning("%s has sha256 %s, not an accepted one: deleting it, fetching again", path, digest)
    path.unlink()
    return None


def _gather(cfg, names, accepted, staging: Path, accept: bool, give_up_after: float):
    """Write `names` into `staging` from the local copy, else the search folders then the
    mirrors; return {name: record}. Raises UserError (with the ways forward) if any is missing."""
    source = cfg.dataset.source
    if source.get("local"):
        return copy_local(Path(str(source.local)).expanduser(), names, accepted, staging, accept)
    folders = [Path(str(folder)).expanduser() for folder in source.get("search") or []]
    done, refused = search_folders(folders, names, accepted, staging, accept)
    for problem in refused:
        log.warning("refused %s", problem)
    if not (missing := [name for name in names if name not in done]):
        return done
    got, failures = fetch_mirrors(cfg, missing, accepted, staging, give_up_after)
    if still := [name for name in missing if name not in got]:
        raise UserError(_ways_forward(cfg, still, failures, folders, refused))
    return done | got


def _install(
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


def _install_each(names, candidates, accepted, staging, user=False, accept=False):
    """Install every name from its candidates; return ({name: record}, [problem, ...])."""
    done, problems = {}, []
    for name in names:
        try:
            if not candidates.get(name):
                raise UserError(f"no {name} there")
            done[name] = _install(staging / name, accepted[name], candidates[name], user, accept)
        except UserError as error:
            problems.append(str(error))
    return done, problems


def _copy_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, path: Path) -> None:
    with archive.open(member) as stream, open(path, "wb") as sink:
        shutil.copyfileobj(stream, sink, 1 << 20)


def _zip_candidates(archive: zipfile.ZipFile, label: str, name: str) -> list[Candidate]:
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
        + [c for label, archive in zips for c in _zip_candidates(archive, label, name)]
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
        done, problems = _install_each(names, candidates, accepted, staging, True, accept)
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
        return _install_each(present, found, accepted, staging, True, accept)


def fetch_mirrors(cfg, names, accepted, staging: Path, give_up_after=GIVE_UP_AFTER_S):
    """Fetch `names` from `cfg.dataset.source.mirrors`, in order, into `staging`.

    Returns ({name: record}, [each URL tried with its error])."""
    source = cfg.dataset.source
    mirrors = list(source.get("mirrors") or [])
    budget, done, failures = Budget(give_up_after), {}, []
    for index, mirror in enumerate(mirrors):
        if not (wanted := [name for name in names if name not in done]):
            break
        budget.share = budget.total / (len(mirrors) - index)  # what is left, shared fairly
        for url, targets, archive in _mirror_urls(mirror, wanted, accepted):
            try:
                got, problems = _fetch(url, targets, archive, accepted, staging, source, budget)
            except FetchError as error:
                got, problems = {}, [str(error)]
            done |= got
            failures += [p if url in p else f"{url}: {p}" for p in problems]
    return done, failures


def _mirror_urls(mirror, wanted: list[str], accepted: dict) -> list[tuple[str, list[str], bool]]:
    """[(url, names it serves, whether it is a zip)] for one mirror entry."""
    if mirror.get("files"):
        return [(str(mirror.files[n]), [n], False) for n in wanted if n in mirror.files]
    archive = mirror.get("archive")
    if archive not in (None, "zip"):
        raise UserError(f"mirror {mirror.url}: archive {archive!r} is not supported (only zip)")
    if archive is None and len(accepted) != 1:
        raise UserError(
            f"mirror {mirror.url} serves one file but the dataset needs {list(accepted)}: "
            "add `archive: zip` or give a `files: {name: url}` map"
        )
    return [(str(mirror.url), wanted, archive == "zip")]


def _fetch(url, names, archive, accepted, staging, source, budget):
    """Fetch one URL (a single file or a zip) into staging; return ({name: record}, [problems])."""
    get = functools.partial(
        mirrors.get, url, retries=source.retries, timeout=source.timeout, budget=budget
    )
    if not archive:
        return _install_each(names, {names[0]: [(url, get)]}, accepted, staging)
    with tempfile.TemporaryDirectory(dir=staging, prefix=".zip-") as folder:
        get(path := Path(folder) / "archive.zip")
        if not zipfile.is_zipfile(path):
            raise FetchError("the answer is not a zip archive")
        with zipfile.ZipFile(path) as zipped:
            found = {name: _zip_candidates(zipped, url, name) for name in names}
            return _install_each(names, found, accepted, staging)


def _ways_forward(cfg, missing, failures, folders, refused) -> str:
    """The message of a failed download: what was searched and tried, what to do instead."""
    dataset = cfg.dataset.name
    lines = [f"could not get {', '.join(missing)} for dataset '{dataset}'."]
    lines += [f"  - refused: {problem}" for problem in refused]
    if folders:
        lines.append("Looked for copies in: " + ", ".join(str(f) for f in folders))
    lines.append("Tried:")
    lines += [f"  - {line}" for line in failures] or ["  (no mirror is configured)"]
    lines.append("Ways forward:")
    steps = []
    if downloads := cfg.paths.get("downloads_dir"):
        what = cfg.dataset.source.get("manual") or ", ".join(missing)
        steps.append(
            f"put {what} in the downloads folder {downloads} ($DLILABS_DOWNLOADS moves it) "
            "and run the same command (or `dvc repro`) again;"
        )
    steps += [
        "connect to the internet and run the same command again;",
        "use a copy elsewhere (the file, a zip holding it or a folder holding either):\n"
        f"       python -m dlilabs.download dataset={dataset} "
        "dataset.source.local=/path/to/file-or-folder",
        "run `make demo`, which trains on bundled MNIST rows and needs no download.",
    ]
    lines += [f"  {number}. {step}" for number, step in enumerate(steps, 1)]
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, str]:
    """Hydra task: download `cfg.dataset` into `cfg.paths.raw_dir`; return {file: sha256}."""
    return download(cfg)


main = stage_main(run)

if __name__ == "__main__":
    main()
