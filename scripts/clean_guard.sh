#!/bin/sh
# `make clean`'s guard: exit 1 with one line, removing nothing, when a folder it is about to
# remove holds a team server's store (a PostgreSQL cluster made by `python -m dlilabs.server
# --data-dir ...`, or a build/server from before the default moved to .server/), saying whether
# the server is running from it (postmaster.pid names a live process).
# Usage: scripts/clean_guard.sh FOLDER...
for folder in "$@"; do
    [ -d "$folder" ] || continue
    for version in $(find "$folder" -path '*/postgres/PG_VERSION' 2>/dev/null); do
        cluster=$(dirname "$version")
        store=$(dirname "$cluster")
        pid=$(head -n 1 "$cluster/postmaster.pid" 2>/dev/null)
        # kill -0 fails for another user's process (root runs PostgreSQL as postgres): /proc too.
        if [ -n "$pid" ] && { kill -0 "$pid" 2>/dev/null || [ -d "/proc/$pid" ]; }; then
            echo "make clean: a tracking server is running from $store (PostgreSQL pid $pid): stop it (Ctrl-C), then move the store out ($store/ -> .server/); nothing removed" >&2
        else
            echo "make clean: $store holds a tracking server's store (runs, artifacts, passwords): move it out first (mv $store .server); nothing removed" >&2
        fi
        exit 1
    done
done
exit 0
