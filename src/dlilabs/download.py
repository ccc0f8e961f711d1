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

This module holds the order (kept file, local or search folders, mirrors) and the messages;
finding and verifying copies on this machine is dlilabs.core.copies, fetching a URL
dlilabs.core.httpfetch.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import zipfile
from pathlib import Path

from omegaconf import DictConfig

from dlilabs.core import httpfetch
from dlilabs.core.copies import Record, copy_local, install_each, search_folders, zip_candidates
from dlilabs.core.httpfetch import Budget, FetchError
from dlilabs.entry import stage_main
from dlilabs.ground.errors import UserError
from dlilabs.ground.io import read_json, sha256_file, write_json

log = logging.getLogger("dlilabs.download")  # not "__main__" under `python -m`

GIVE_UP_AFTER_S = 8.0  # leaves ~2 s of the 10 s promise for starting Python and Hydra
PROVENANCE = "provenance.json"


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
    except (UserError, OSError, ValueError, KeyError, TypeError):  # missing, damaged, old
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


def fetch_mirrors(cfg, names, accepted, staging: Path, give_up_after=GIVE_UP_AFTER_S):
    """Fetch `names` from `cfg.dataset.source.mirrors`, in order, into `staging`.

    Returns ({name: record}, [each URL tried with its error])."""
    source = cfg.dataset.source
    configured = list(source.get("mirrors") or [])
    budget, done, failures = Budget(give_up_after), {}, []
    for index, mirror in enumerate(configured):
        if not (wanted := [name for name in names if name not in done]):
            break
        budget.share = budget.total / (len(configured) - index)  # what is left, shared fairly
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
        httpfetch.get, url, retries=source.retries, timeout=source.timeout, budget=budget
    )
    if not archive:
        return install_each(names, {names[0]: [(url, get)]}, accepted, staging)
    with tempfile.TemporaryDirectory(dir=staging, prefix=".zip-") as folder:
        get(path := Path(folder) / "archive.zip")
        if not zipfile.is_zipfile(path):
            raise FetchError("the answer is not a zip archive")
        with zipfile.ZipFile(path) as zipped:
            found = {name: zip_candidates(zipped, url, name) for name in names}
            return install_each(names, found, accepted, staging)


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
    from dlilabs.ground.startup import run_command

    run_command(main)
