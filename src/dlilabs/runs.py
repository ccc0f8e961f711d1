"""`python -m dlilabs.runs`: find and end runs left RUNNING by a process that is gone.

    python -m dlilabs.runs list          # the stale runs: id, lab, host, pid, last heartbeat, why
    python -m dlilabs.runs reconcile     # end them KILLED at their last heartbeat
    python -m dlilabs.runs list --experiment dlilabs-demo --tracking-uri http://127.0.0.1:5001

A run is stale when its owner process is gone on this host, or when it ran on another host
and sent no heartbeat for `tracking.stale_after_minutes` (`--stale-after`). Every stage start
reconciles its experiment anyway; this command shows what is left and cleans another
experiment or store. Defaults (store URI, experiment, timeout) come from conf/tracking.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

from dlilabs.ground.errors import UserError
from dlilabs.tracking import end_stale, find_stale, running_runs
from dlilabs.tracking.query import client_for
from dlilabs.tracking.store import check_writable


def age(milliseconds: int, now: float | None = None) -> str:
    """How long ago an epoch-ms time was: '45 s ago', '12 min ago', '3.5 h ago'."""
    seconds = max(0.0, (now or time.time()) - milliseconds / 1000)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def table(stale: list) -> str:
    """The stale runs as aligned text columns."""
    rows = [("run", "lab / name", "host", "pid", "last heartbeat", "why stale")]
    for item in stale:
        tags = item.run.data.tags
        rows.append(
            (
                item.run.info.run_id,
                item.name,
                tags.get("owner.host", "?"),
                tags.get("owner.pid", "?"),
                age(item.last_seen),
                item.reason,
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(
            [*(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)), row[-1]]
        )
        for row in rows
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; defaults from conf/tracking (store, experiment, timeout)."""
    from dlilabs.ground.config import compose

    tracking = compose().tracking
    stale_after = float(tracking.get("stale_after_minutes", 30))
    parser = argparse.ArgumentParser(
        prog="python -m dlilabs.runs",
        description="Find (list) and end (reconcile) MLflow runs whose process is gone.",
    )
    parser.add_argument("action", choices=["list", "reconcile"])
    parser.add_argument("--tracking-uri", default=tracking.uri, help="default: %(default)s")
    parser.add_argument(
        "--experiment", default=tracking.experiment_name, help="default: %(default)s"
    )
    parser.add_argument(
        "--stale-after",
        type=float,
        default=stale_after,
        metavar="MINUTES",
        help="runs of other hosts are stale after this long without a heartbeat "
        "(default: %(default)s, tracking.stale_after_minutes)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """List or end the stale runs of one experiment; exit 2 with one line on a user error."""
    args = parse_args(argv)
    try:
        client = client_for(args.tracking_uri)
        experiment = client.get_experiment_by_name(args.experiment)
        if experiment is None:
            names = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise UserError(
                f"no experiment {args.experiment!r} in the MLflow store {args.tracking_uri} "
                f"(experiments there: {names}): pass --experiment"
            )
        database = args.tracking_uri.removeprefix("sqlite:///")
        if args.action == "reconcile" and database != args.tracking_uri:
            check_writable(Path(database))  # one line now, not a SQL traceback mid-way
        running = running_runs(client, experiment.experiment_id)
        stale = find_stale(client, experiment.experiment_id, args.stale_after * 60, running)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    where = f"experiment {args.experiment!r} ({args.tracking_uri})"
    if not stale:
        print(f"No stale runs in {where}: {len(running)} RUNNING, all with a live owner.")
        return 0
    print(f"{len(stale)} stale of {len(running)} RUNNING runs in {where}:\n{table(stale)}")
    if args.action == "reconcile":
        ended = 0
        for item in stale:
            if end_stale(client, item):
                ended += 1
                when = datetime.datetime.fromtimestamp(item.last_seen / 1000)
                print(
                    f"ended {item.run.info.run_id} ({item.name}) KILLED at "
                    f"{when:%Y-%m-%d %H:%M:%S} (its last heartbeat): {item.reason}"
                )
        print(f"Reconciled {ended} run(s).")
    return 0


if __name__ == "__main__":
    from dlilabs.ground.startup import run_command

    run_command(main)
