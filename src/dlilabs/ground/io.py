"""File helpers every stage shares: the one error path for files, atomic writes, hashing.

Reading: every file a stage reads is read inside `reading(path, stage)`, which turns a
missing or damaged file into one UserError naming it and the way back (`dvc checkout` of the
file, `dvc repro` of the stage that writes it). Writing: stages never leave half-written
outputs: they write to a temporary sibling and rename it into place only once complete
(rename is atomic on one filesystem), and a full disk or a read-only folder is one UserError
naming the file (`writing`, `write_problem`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from dlilabs.ground.errors import UserError

# What readers raise when a file's bytes are not what they expect: numpy (BadZipFile for a
# truncated npz, EOFError for an empty one, ValueError for one that is not an archive,
# KeyError for a missing array), Keras (ValueError, BadZipFile), json and pandas (ValueError
# subclasses), a bad disk (OSError).
DAMAGE = (OSError, ValueError, EOFError, KeyError, IndexError, zipfile.BadZipFile, zlib.error)
# A write that failed because of where it writes, not what: what to do about each.
WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full: free space there",
    errno.EDQUOT: "the disk quota is used up: free space there",
    errno.EFBIG: "the file is larger than this file system or process may write",
    errno.EROFS: "the folder is on a read-only file system",
    errno.EACCES: "no permission to write in that folder",
    errno.EPERM: "no permission to write in that folder",
}


class DamagedFile(UserError):
    """A stage's input exists but cannot be read as what it should be."""


class UnwritableFile(UserError):
    """An output could not be written (disk full, read-only, no permission); nothing was kept."""


def shown(path: str | os.PathLike) -> str:
    """`path` as a user types it: relative to the working directory when inside it."""
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.absolute().relative_to(Path.cwd()))
    return str(path)


def way_back(path: str | os.PathLike, stage: str, cached: bool = True) -> str:
    """How to get a good `path` back (a file, or the DVC output folder holding it): DVC's
    cached copy (`cached`: the output is in DVC's cache), or running again the `stage` that
    writes it (e.g. "preprocess@mnist")."""
    checkout = f"restore it with `dvc checkout {shown(path)}` or " if cached else ""
    return f"{checkout}rebuild it with `dvc repro {stage}`"


def _reason(error: BaseException) -> str:
    """An exception's first line, short, or its type's name."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip().strip("'\"")
    return (text.splitlines()[0][:160] if text else "") or type(error).__name__


@contextlib.contextmanager
def reading(
    path: str | os.PathLike,
    stage: str | None,
    what: str = "file",
    cached: bool = True,
    out: str | os.PathLike | None = None,
) -> Iterator[Path]:
    """Around the code that reads `path` (the `what`: "JSON file", ...), written by DVC stage
    `stage` (None: a file the user gave) as DVC output `out` (default: `path` itself; a
    folder output holding it): a missing file is a UserError saying to run that stage; any
    DAMAGE the block raises is a DamagedFile naming the file and `way_back`. Yields `path`."""
    path = Path(path)
    if not path.is_file():
        run = f": run `dvc repro {stage}` first" if stage else ""
        raise UserError(f"{shown(path)} does not exist{run}")

    def damaged(error: BaseException) -> str:
        problem = f"not a readable {what} ({_reason(error)})"
        if stage is None:
            return f"{shown(path)}: {problem}"
        return f"{shown(path)} is damaged: {problem}; {way_back(out or path, stage, cached)}"

    try:
        yield path
    except UserError:
        raise
    except PermissionError as error:
        raise UserError(f"{shown(path)}: cannot read it ({_reason(error)})") from None
    except OSError as error:
        # A reader that unpacks to a temporary file can meet a full disk: not the file's fault.
        if error.errno in WRITE_ERRNOS:
            raise UnwritableFile(write_problem(error)) from None
        raise DamagedFile(damaged(error)) from None
    except DAMAGE as error:
        raise DamagedFile(damaged(error)) from None


def write_problem(
    error: BaseException, target: str | os.PathLike | None = None, cleaned: bool = False
) -> str | None:
    """One line for a write that failed because of where it writes (see WRITE_ERRNOS):
    the file (`target`, else the error's), why, that nothing partial is left (`cleaned`: the
    writer removed it) and what to do; None for any other error."""
    if not isinstance(error, OSError) or error.errno not in WRITE_ERRNOS:
        return None
    # A copy (shutil) names its source first and the file it wrote second.
    where = target if target is not None else (error.filename2 or error.filename or "an output")
    return (
        f"cannot write {shown(where)}: {error.strerror} ({WRITE_ERRNOS[error.errno]}); "
        + ("nothing half-written was kept: " if cleaned else "")
        + "fix that, then run the command again"
    )


@contextlib.contextmanager
def writing(target: str | os.PathLike, cleaned: bool = False) -> Iterator[None]:
    """Around the code that writes `target` (and, if `cleaned`, removes what it wrote when it
    fails): a full disk, read-only folder or missing permission is an UnwritableFile naming
    `target` (see write_problem)."""
    try:
        yield
    except OSError as error:
        problem = write_problem(error, target, cleaned)
        if problem is None:
            raise
        raise UnwritableFile(problem) from None


def current_umask() -> int:
    """The process's umask, read from /proc (Linux) rather than set and reset with os.umask,
    which would briefly change it for every thread."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it.
    The file gets the mode a new file would (0666 less the umask).

    `suffix` defaults to the target's own suffix, for writers that insist on one (np.savez,
    keras.Model.save). A full disk or read-only folder is an UnwritableFile (`writing`)."""
    target = Path(path)
    with writing(target, cleaned=True):
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{target.name}.",
            suffix=suffix if suffix is not None else target.suffix,
            dir=target.parent,
        )
        os.close(handle)
        temporary = Path(temporary)
        try:
            # mkstemp makes the file 0600; an output is a new file like any other: 0666 less
            # the umask (0644 usually), or teammates and services could not read eval/.
            temporary.chmod(0o666 & ~current_umask())
            yield temporary
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: object) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, stage: str | None = None, cached: bool = True) -> dict:
    """Read a JSON object written by `write_json` (by DVC stage `stage`, see `reading`)."""
    with reading(path, stage, "JSON file", cached) as source:
        data = json.loads(source.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"a JSON {type(data).__name__}, not an object")
        return data


def read_npz(path: str | os.PathLike, keys: tuple[str, ...], stage: str | None) -> tuple:
    """The arrays `keys` of an .npz file written by DVC stage `stage` (no pickles), in that
    order; a file that is not such an archive is a DamagedFile (see `reading`)."""
    import numpy as np  # ground stays light for the commands that never read arrays

    what = f".npz archive of arrays {', '.join(keys)}"
    with reading(path, stage, what) as source, np.load(source, allow_pickle=False) as archive:
        missing = [key for key in keys if key not in archive.files]
        if missing:
            raise KeyError(f"no array {', '.join(missing)}")
        return tuple(archive[key] for key in keys)


def once_per_file_state(function):
    """`function(path) -> str` (a digest), remembered in this process per file state: its
    resolved path, size, modification time (ns) and inode, what DVC's own state database keys
    its hashes on. A sweep's jobs in one process hash the same splits once (three digests of
    two files: ~0.1 s a job for the ASL splits); a file written again is hashed again."""
    memo: dict[tuple, str] = {}

    @functools.wraps(function)
    def remembered(path: str | os.PathLike) -> str:
        state = os.stat(path)
        key = (str(Path(path).resolve()), state.st_size, state.st_mtime_ns, state.st_ino)
        if key not in memo:
            memo[key] = function(path)
        return memo[key]

    return remembered


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
