"""A stage's MLflow side in a process of its own, beside the stage's Keras work (`aside`).

Importing TensorFlow keeps one core busy for ~4 s, and importing MLflow and opening its store
another ~1.5 s: one after the other in one process, they are most of what the evaluate stage
costs beyond its work. A process forked before TensorFlow loads does the MLflow side (import,
connect, mark the run, then log what the stage sends it) while the stage imports Keras and
scores, on the other core.

    with aside(lambda receive: record(receive())) as send:
        ...                     # TensorFlow work; may raise
        send(results)           # once: what `record` logs (picklable)

At the block's end this process waits for the other, and raises what went wrong there: a
UserError with its message for the user's mistakes (a store that cannot be written, a lost
tracking server, a full disk), else a RuntimeError carrying the other side's traceback. An
error in the block reaches the work as `StageFailed` from `receive()` (so it can record it),
then is raised here as it was. If this process dies, the work's `receive()` raises
StageFailed too. Where forking is not safe (TensorFlow already loaded: its threads do not
survive a fork) or not possible, the work runs in this process at the block's end.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import traceback
from collections.abc import Callable, Iterator

from dlilabs.ground.errors import UserError
from dlilabs.ground.startup import write_all

_NOTHING = object()


class StageFailed(Exception):
    """What `receive()` raises when the stage's block failed or its process is gone: the
    stage's error type name and first line (`kind`, `text`)."""

    def __init__(self, kind: str, text: str):
        super().__init__(text)
        self.kind = kind


def _user_message(error: BaseException) -> str | None:
    """The one line the entry point would print for `error`, if it is the user's to fix."""
    from dlilabs.ground.io import write_problem
    from dlilabs.tracking.store import tracking_user_error

    if isinstance(error, UserError):
        return str(error)
    with contextlib.suppress(Exception):  # no MLflow tracking URI to compare with, say
        found = tracking_user_error(error)
        if found is not None:
            return str(found)
    return write_problem(error)


def _outcome(work: Callable[[Callable[[], object]], None], receive) -> tuple[str, str]:
    """Run `work(receive)`: ("ok", ""), ("user", message), ("stage", "") when it re-raised
    the stage's own failure, or ("error", traceback)."""
    try:
        work(receive)
    except StageFailed:
        return "stage", ""
    except BaseException as error:  # noqa: BLE001 - everything goes back to the stage
        message = _user_message(error)
        if message is not None:
            return "user", message
        return "error", "".join(traceback.format_exception(error))
    return "ok", ""


def _read_all(descriptor: int) -> bytes:
    chunks = []
    while chunk := os.read(descriptor, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _raise(kind: str, text: str) -> None:
    if kind == "user":
        raise UserError(text)
    if kind == "error":
        raise RuntimeError(f"the stage's MLflow side failed:\n{text}")


def _failure(error: BaseException) -> StageFailed:
    lines = str(error).strip().splitlines()
    return StageFailed(type(error).__name__, lines[0] if lines else type(error).__name__)


def forking_is_safe() -> bool:
    """Whether `aside` forks here: possible on this OS, and TensorFlow not loaded yet."""
    return hasattr(os, "fork") and "tensorflow" not in sys.modules


@contextlib.contextmanager
def aside(work: Callable[[Callable[[], object]], None]) -> Iterator[Callable[[object], None]]:
    """Run `work(receive)` beside the block (see the module doc); yields `send`."""
    if not forking_is_safe():
        yield from _inline(work)
        return
    results_read, results_write = os.pipe()
    message_read, message_write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the MLflow side: never returns into the stage's code
        status = 1
        try:
            os.close(results_read)
            os.close(message_write)

            def receive() -> object:
                data = _read_all(message_read)
                if not data:
                    raise StageFailed("Stopped", "the stage's process stopped before it was done")
                kind, payload = pickle.loads(data)
                if kind == "failed":
                    raise StageFailed(*payload)
                return payload

            write_all(results_write, pickle.dumps(_outcome(work, receive)))
            status = 0
        finally:
            with contextlib.suppress(Exception):
                from dlilabs.tracking.store import close_connections

                close_connections()  # the store's write-ahead log folded in (os._exit skips it)
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)  # no atexit handlers, no Hydra clean-up: those are the stage's
    os.close(message_read)
    os.close(results_write)
    sent = False

    def send(payload: object) -> None:
        nonlocal sent
        if sent:
            raise RuntimeError("aside: send() is called once")
        sent = True
        try:
            write_all(message_write, pickle.dumps(("done", payload)))
        except BrokenPipeError:  # the other side is gone: its outcome, read below, says why
            pass
        finally:
            os.close(message_write)

    try:
        yield send
    except BaseException as error:
        if not sent:  # the other side records the failure, then exits
            sent = True
            failure = _failure(error)
            with contextlib.suppress(OSError):
                message = pickle.dumps(("failed", (failure.kind, str(failure))))
                write_all(message_write, message)
            os.close(message_write)
        _wait(pid, results_read)
        raise
    if not sent:
        os.close(message_write)
        _wait(pid, results_read)
        raise RuntimeError("aside: the block ended without send()")
    _raise(*_wait(pid, results_read))


def _wait(pid: int, results: int) -> tuple[str, str]:
    """The other process's outcome (see `_outcome`), once it has exited."""
    try:
        data = _read_all(results)
    finally:
        os.close(results)
    _, status = os.waitpid(pid, 0)
    if data:
        return pickle.loads(data)
    cause = f"signal {-os.waitstatus_to_exitcode(status)}" if os.WIFSIGNALED(status) else "exit"
    return "user", f"the stage's MLflow logging process died ({cause}) before it said how it went"


def _inline(work: Callable[[Callable[[], object]], None]) -> Iterator[Callable[[object], None]]:
    """`aside` without a fork: the work runs at the block's end, in this process."""
    box: dict = {"payload": _NOTHING}

    def send(payload: object) -> None:
        box["payload"] = payload

    def receive() -> object:
        if "failure" in box:
            raise box["failure"]
        return box["payload"]

    try:
        yield send
    except BaseException as error:
        box["failure"] = _failure(error)
        with contextlib.suppress(Exception):  # the stage's error is the one to show
            work(receive)
        raise
    if box["payload"] is _NOTHING:
        raise RuntimeError("aside: the block ended without send()")
    work(receive)
