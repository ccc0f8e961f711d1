"""Download stage: put a dataset's raw files in `paths.raw_dir`, each verified by sha256.

`python -m dlilabs.download dataset=asl` reads `cfg.dataset.source`:

    local:   a file, a zip holding the files or a folder holding either; replaces the mirrors
    mirrors: tried in order, each {url} (the one file), {url, archive: zip} (a zip holding the
             files in any sub-folder) or {files: {name: url}} (one URL per file)
    files:   {name: [accepted sha256, ...]}
    timeout: seconds to wait for a connection or between bytes; retries: extra tries per URL

A file already in place with an accepted hash is kept. Downloads stream through pooch's
HTTPDownloader (tqdm progress bar) into a temporary file renamed into place once verified.
Mirrors that send nothing may cost GIVE_UP_AFTER_S seconds in all, shared between them, so
an offline run fails in under 10 s and says what to do instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import pooch
import requests
from omegaconf import DictConfig

from dlilabs.cli import stage_main
from dlilabs.errors import UserError
from dlilabs.io import atomic_path, sha256_file

log = logging.getLogger("dlilabs.download")  # not "__main__" under `python -m`

GIVE_UP_AFTER_S = 8.0  # leaves ~2 s of the 10 s promise for starting Python and Hydra
BACKOFF_S = 0.5  # first pause between tries of one URL, doubled at each retry
MIN_TRY_S = 0.5  # a try with less time than this could not even connect: skip it
# Worth another try: no connection, no answer in time, a transfer cut short, a busy server.
TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
RETRY_STATUS = {429, 500, 502, 503, 504}

Candidate = tuple[str, Callable[[Path], None]]  # (where a copy is, function writing it to a path)


class ChecksumError(UserError):
    """A file's sha256 is none of the accepted ones (the bad copy has been deleted)."""


class FetchError(Exception):
    """One URL could not be fetched; the message says why in a few words."""


class _Budget:
    """Seconds still allowed for waiting on mirrors, each mirror getting a fair share. Only
    tries that received no data are charged (and the pauses between tries): a slow download
    that is making progress is never cut short."""

    def __init__(self, seconds: float) -> None:
        self.total = self.share = seconds

    def charge(self, seconds: float) -> None:
        self.total -= seconds
        self.share -= seconds


def download(cfg: DictConfig, give_up_after: float = GIVE_UP_AFTER_S) -> dict[str, str]:
    """Materialise `cfg.dataset.source.files` in `cfg.paths.raw_dir`; return {file name: sha256}.

    Raises UserError when the dataset has no source, the local copy is unusable, a hash is
    wrong or every mirror failed (listing each URL tried and the ways forward)."""
    source = cfg.dataset.get("source")
    if source is None:
        raise UserError(f"dataset {cfg.dataset.name!r} has no `source`: nothing to download")
    accepted = {  # a lone hash written without brackets is a list of one
        name: [str(h).lower() for h in ([hashes] if isinstance(hashes, str) else hashes)]
        for name, hashes in source.files.items()
    }
    raw_dir = Path(cfg.paths.raw_dir)
    done = {n: digest for n in accepted if (digest := _present(raw_dir / n, accepted[n]))}
    missing = [name for name in accepted if name not in done]
    if missing and source.get("local"):
        done |= copy_local(Path(str(source.local)).expanduser(), missing, accepted, raw_dir)
    elif missing:
        done |= fetch_mirrors(cfg, missing, accepted, give_up_after)
    return {name: done[name] for name in accepted}


def _present(path: Path, accepted: list[str]) -> str | None:
    """The sha256 of `path` if it exists with an accepted hash; a bad copy is deleted."""
    if not path.is_file():
        return None
    if (digest := sha256_file(path)) in accepted:
        log.info("%s: already present, verified (sha256 %s)", path.name, digest)
        return digest
    log.warning("%s has sha256 %s, not an accepted one: deleting it, fetching again", path, digest)
    path.unlink()
    return None


def _install(target: Path, accepted: list[str], candidates: list[Candidate]) -> str:
    """Write the first candidate whose sha256 is accepted to `target`; return that sha256.

    A wrong copy never reaches `target`: the error is raised inside atomic_path, which
    deletes the temporary. If every candidate is wrong, the first ChecksumError is raised."""
    errors = []
    for origin, write in candidates:
        try:
            with atomic_path(target) as temporary:
                write(temporary)
                if (digest := sha256_file(temporary)) not in accepted:
                    raise ChecksumError(
                        f"{target.name} from {origin}: checksum mismatch, expected sha256 "
                        f"{' or '.join(accepted)}, found {digest}; the bad copy was deleted"
                    )
        except ChecksumError as error:
            errors.append(error)
            continue
        log.info("%s: sha256 %s (from %s)", target.name, digest, origin)
        return digest
    raise errors[0]


def _install_each(names, candidates, accepted, raw_dir) -> tuple[dict[str, str], list[str]]:
    """Install every name from its candidates; return ({name: sha256}, [problem, ...])."""
    done, problems = {}, []
    for name in names:
        try:
            if not candidates.get(name):
                raise UserError(f"no {name} there")
            done[name] = _install(raw_dir / name, accepted[name], candidates[name])
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


def copy_local(path: Path, names: list[str], accepted: dict, raw_dir: Path) -> dict[str, str]:
    """Copy or extract `names` from the user's `path` into `raw_dir`; return {name: sha256}.

    `path` is one of the files, a zip holding them, or a folder holding either at any depth.
    A one-file dataset also takes the file under another name (its hash decides)."""
    where = f"dataset.source.local={path}"
    if not path.exists():
        raise UserError(f"{where}: no such file or folder")
    files = [path] if path.is_file() else sorted(path.rglob("*"), key=lambda p: len(p.parts))
    files = [p for p in files if p.is_file()]
    with contextlib.ExitStack() as stack:
        # In a folder only *.zip files are searched: an .npz is a zip too, but not a holder.
        zips = [
            (str(p), stack.enter_context(zipfile.ZipFile(p)))
            for p in files
            if p.name not in names and (p.suffix == ".zip" or p == path) and zipfile.is_zipfile(p)
        ]
        candidates = {
            name: [
                (str(p), functools.partial(shutil.copyfile, p))
                for p in files
                if p.name == name or (p == path and len(accepted) == 1)
            ]
            + [c for label, archive in zips for c in _zip_candidates(archive, label, name)]
            for name in names
        }
        done, problems = _install_each(names, candidates, accepted, raw_dir)
    if problems:
        hint = "give the file itself, a zip holding it, or a folder holding either"
        raise UserError(f"{where}: {'; '.join(problems)} ({hint})")
    return done


def fetch_mirrors(
    cfg: DictConfig, names: list[str], accepted: dict, give_up_after: float = GIVE_UP_AFTER_S
) -> dict[str, str]:
    """Fetch `names` from `cfg.dataset.source.mirrors`, in order; return {name: sha256}.

    Raises UserError listing each URL tried with its error, and the ways forward."""
    source, raw_dir = cfg.dataset.source, Path(cfg.paths.raw_dir)
    mirrors = list(source.get("mirrors") or [])
    budget, done, failures = _Budget(give_up_after), {}, []
    for index, mirror in enumerate(mirrors):
        if not (wanted := [name for name in names if name not in done]):
            break
        budget.share = budget.total / (len(mirrors) - index)  # what is left, shared fairly
        for url, targets, archive in _mirror_urls(mirror, wanted, accepted):
            try:
                got, problems = _fetch(url, targets, archive, accepted, raw_dir, source, budget)
            except FetchError as error:
                got, problems = {}, [str(error)]
            done |= got
            failures += [p if url in p else f"{url}: {p}" for p in problems]
    if missing := [name for name in names if name not in done]:
        raise UserError(_ways_forward(cfg.dataset.name, missing, failures))
    return done


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


def _fetch(url, names, archive, accepted, raw_dir, source, budget):
    """Fetch one URL (a single file or a zip) into raw_dir; return ({name: sha256}, [problems])."""
    get = functools.partial(_get, url, source=source, budget=budget)
    if not archive:
        return _install_each(names, {names[0]: [(url, get)]}, accepted, raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)  # the zip waits beside its destination
    with tempfile.TemporaryDirectory(dir=raw_dir, prefix=".download-") as folder:
        get(path := Path(folder) / "archive.zip")
        if not zipfile.is_zipfile(path):
            raise FetchError("the answer is not a zip archive")
        with zipfile.ZipFile(path) as zipped:
            found = {name: _zip_candidates(zipped, url, name) for name in names}
            return _install_each(names, found, accepted, raw_dir)


def _get(url: str, path: Path, source: DictConfig, budget: _Budget) -> None:
    """Stream `url` into `path` with pooch (progress bar), retrying transient errors with
    backoff while the budget allows; raise FetchError saying why it failed."""
    tries, last = int(source.retries) + 1, "not tried: earlier mirrors used up the time budget"
    for attempt in range(tries):
        pause = BACKOFF_S * 2 ** (attempt - 1) if attempt else 0.0
        if (limit := min(float(source.timeout), budget.share - pause)) < MIN_TRY_S:
            break
        time.sleep(pause)
        budget.charge(pause)
        started = time.monotonic()
        try:
            pooch.HTTPDownloader(progressbar=True, timeout=limit, chunk_size=1 << 16)(
                url, str(path), None
            )
            return
        except requests.HTTPError as error:
            last = _describe(error, limit)
            if error.response is None or error.response.status_code not in RETRY_STATUS:
                raise FetchError(last) from error  # 404 and friends: retrying will not help
        except TRANSIENT as error:
            last = _describe(error, limit)
        except requests.RequestException as error:  # a malformed URL, too many redirects...
            raise FetchError(_describe(error, limit)) from error
        if not path.exists() or path.stat().st_size == 0:
            budget.charge(time.monotonic() - started)
        log.warning("%s: %s (try %d of %d)", url, last, attempt + 1, tries)
    raise FetchError(last)


def _describe(error: Exception, limit: float) -> str:
    """A few words on why a request failed, instead of urllib3's nested repr."""
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code} {error.response.reason}"
    if isinstance(error, requests.ConnectTimeout):
        return f"no connection within {limit:.1f} s"
    if isinstance(error, requests.ReadTimeout) or "Read timed out" in str(error):
        return f"connected, but no data for {limit:.1f} s"
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return "transfer cut short (the connection closed before the end of the file)"
    reason = re.search(r"\[Errno [-\d]+\] ([^'\")]+)", str(error))
    return f"cannot connect: {reason.group(1)}" if reason else f"{type(error).__name__}: {error}"


def _ways_forward(dataset: str, missing: list[str], failures: list[str]) -> str:
    """The message of a failed download: what was tried, and what to do instead."""
    tried = "\n".join(f"  - {line}" for line in failures) or "  (no mirror is configured)"
    return (
        f"could not download {', '.join(missing)} for dataset '{dataset}'. Tried:\n{tried}\n"
        "Ways forward:\n"
        "  1. connect to the internet and run the same command again;\n"
        "  2. use a copy you already have (the file, a zip holding it or a folder holding "
        f"either):\n       python -m dlilabs.download dataset={dataset} "
        "dataset.source.local=/path/to/file-or-folder\n"
        "  3. run `make demo`, which trains on bundled MNIST rows and needs no download."
    )


def run(cfg: DictConfig) -> dict[str, str]:
    """Hydra task: download `cfg.dataset` into `cfg.paths.raw_dir`; return {file: sha256}."""
    return download(cfg)


main = stage_main(run)

if __name__ == "__main__":
    main()
