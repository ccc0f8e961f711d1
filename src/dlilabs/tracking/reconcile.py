"""No ghost runs: who owns a run, its heartbeat, and ending runs whose owner is gone.

A run killed without warning (`kill -9`, the OOM killer, SLURM preemption, a closed laptop)
cannot end itself, so MLflow would show it RUNNING forever. Every dlilabs run therefore
records its owner when it starts (tags `owner.host`, `owner.pid`, `owner.start_time`: the
process's start time, so a reused pid is not mistaken for the owner) and a `heartbeat` tag
(epoch milliseconds) that a daemon thread refreshes every `HEARTBEAT_SECONDS` and the epoch
logger at every epoch. `find_stale` names the RUNNING runs whose owner is gone:

    this host    the owner process is no longer alive (or its pid now belongs to another one)
    other hosts  (unknown to us) no heartbeat for `stale_after` seconds
    no owner     (made outside dlilabs, or before it recorded owners) started that long ago

and `end_stale` ends them KILLED, with end time = their last heartbeat, tagged `reconciled`.
Every stage start (`store.connect`) and `python -m dlilabs.runs` do this.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time

import psutil
from mlflow import MlflowClient
from mlflow.entities import Run

log = logging.getLogger("dlilabs.tracking")

OWNER_HOST, OWNER_PID, OWNER_START = "owner.host", "owner.pid", "owner.start_time"
HEARTBEAT = "heartbeat"  # epoch ms of the owner's last sign of life
RECONCILED = "reconciled"  # what reconcile did, e.g. "killed: process 1234 is gone"
HEARTBEAT_SECONDS = 30.0
# psutil derives start times from boot time + clock ticks: equal for one process, up to a
# tick apart between calls; a reused pid starts seconds or more later.
SAME_START_SECONDS = 1.0


def now_ms() -> int:
    return int(time.time() * 1000)


def process_start_time(pid: int) -> float | None:
    """Start time (epoch seconds) of process `pid`, None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def gone(pid: int, recorded_start: str | None) -> str | None:
    """Why the process `pid` (of this host) that started at `recorded_start` (epoch seconds,
    as tagged) is gone, or None while it lives or we cannot tell."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped by its parent
            return f"process {pid} is gone"
        started = process.create_time()
    except psutil.NoSuchProcess:
        return f"process {pid} is gone"
    except psutil.AccessDenied:  # another user's process (macOS): it exists
        return None
    try:
        recorded = float(recorded_start)
    except (TypeError, ValueError):
        return None  # alive, and no start time to tell a reused pid apart: leave it
    if abs(started - recorded) > SAME_START_SECONDS:
        return f"process {pid} is gone (its pid now belongs to another process)"
    return None


def owner_tags() -> dict[str, str]:
    """The tags that say this process owns a run, with a first heartbeat."""
    pid = os.getpid()
    return {
        OWNER_HOST: socket.gethostname(),
        OWNER_PID: str(pid),
        OWNER_START: f"{process_start_time(pid):.2f}",
        HEARTBEAT: str(now_ms()),
    }


class Heartbeat:
    """A daemon thread that sets the run's `heartbeat` tag every `seconds` while the run is
    RUNNING; `stop()` ends it (it also ends by itself once the run has ended). A failed beat
    (store busy, server gone) is logged once and never disturbs the run."""

    def __init__(self, run_id: str, seconds: float = HEARTBEAT_SECONDS):
        self.run_id, self.seconds = run_id, seconds
        self.client = MlflowClient()  # bound to the store the run is in, now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id}", daemon=True)
        self._warned = False

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.seconds):
            try:
                if self.client.get_run(self.run_id).info.status != "RUNNING":
                    return
                self.client.set_tag(self.run_id, HEARTBEAT, str(now_ms()))
            except Exception as error:  # a heartbeat must never fail the run
                # A busy SQLite store only delays this beat; say so once for anything else.
                if not self._warned and "database is locked" not in str(error):
                    log.warning("could not record the heartbeat of run %s: %s", self.run_id, error)
                    self._warned = True


@dataclasses.dataclass
class Stale:
    """A RUNNING run whose owner is gone: why, and when it was last seen alive (epoch ms)."""

    run: Run
    reason: str
    last_seen: int

    @property
    def name(self) -> str:
        return self.run.data.tags.get("lab") or self.run.info.run_name or "?"


def last_seen(run: Run) -> int:
    """The run's last heartbeat (epoch ms), or its start time when it has none."""
    try:
        return max(int(run.data.tags[HEARTBEAT]), run.info.start_time)
    except (KeyError, ValueError):
        return run.info.start_time


def why_stale(run: Run, stale_after: float, host: str, now: int) -> str | None:
    """Why the RUNNING `run` has no live owner, or None while it may still be alive.
    `stale_after` (seconds) applies to runs owned elsewhere; `now` is epoch ms."""
    tags = run.data.tags
    minutes = (now - last_seen(run)) / 60_000
    if tags.get(OWNER_HOST) == host and tags.get(OWNER_PID, "").isdigit():
        return gone(int(tags[OWNER_PID]), tags.get(OWNER_START))
    if minutes * 60 <= stale_after:
        return None
    if OWNER_HOST in tags:
        return f"no heartbeat from {tags[OWNER_HOST]} for {minutes:.0f} min"
    return f"no owner recorded and no heartbeat, started {minutes:.0f} min ago"


def running_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    """Every RUNNING run of the experiment, oldest first."""
    return client.search_runs(
        [experiment_id],
        "attributes.status = 'RUNNING'",
        max_results=5000,
        order_by=["attributes.start_time ASC"],
    )


def find_stale(
    client: MlflowClient, experiment_id: str, stale_after: float, runs: list[Run] | None = None
) -> list[Stale]:
    """The RUNNING runs of the experiment whose owner is gone (see `why_stale`)."""
    host, now = socket.gethostname(), now_ms()
    if runs is None:
        runs = running_runs(client, experiment_id)
    found = []
    for run in runs:
        reason = why_stale(run, stale_after, host, now)
        if reason is not None:
            found.append(Stale(run, reason, last_seen(run)))
    return found


def end_stale(client: MlflowClient, stale: Stale) -> bool:
    """End a stale run KILLED at its last heartbeat, tagged with what was done and why.
    False if it ended meanwhile: its owner may have finished it just before exiting, and
    the status read here comes after the owner was found gone, so it is final."""
    run_id = stale.run.info.run_id
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_tag(run_id, RECONCILED, f"killed: {stale.reason}")
    client.set_terminated(run_id, "KILLED", end_time=stale.last_seen)
    return True


def reconcile_quietly(experiment_id: str, stale_after_minutes: float) -> list[Stale]:
    """At a stage or sweep start: end the experiment's stale runs in the current store, with
    a warning for each. Never raises (a store that cannot be reconciled now is only warned
    about: the stage's own work matters more). Returns the runs it ended."""
    ended = []
    try:
        client = MlflowClient()
        for stale in find_stale(client, experiment_id, stale_after_minutes * 60):
            if not end_stale(client, stale):
                continue
            ended.append(stale)
            log.warning(
                "run %s (%s) was left RUNNING: %s; marked KILLED",
                stale.run.info.run_id,
                stale.name,
                stale.reason,
            )
    except Exception as error:
        log.warning("could not check the store for runs left RUNNING: %s", error)
    return ended
