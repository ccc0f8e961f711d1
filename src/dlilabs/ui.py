"""`python -m dlilabs.ui [--port 5000]` (or `make ui`): the MLflow UI over the project's store,
and the link that opens it on the story.

Starts `mlflow ui` on 127.0.0.1 over the SQLite store (`<store>/mlflow.db`, artifacts in
`<store>/mlartifacts`) and, once it answers, prints the link to the runs of the demo's
experiment (else the labs'), in chart mode and in the saved view "The story"
(`dlilabs.tracking.uiview.runs_url`). A bare http://127.0.0.1:5000 in a fresh browser opens
MLflow 3's GenAI pages instead. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from dlilabs.ground.config import compose, store_root
from dlilabs.ground.errors import UserError
from dlilabs.tracking.teamserver import check_port_free, wait_healthy
from dlilabs.tracking.uiview import landing, runs_url


def experiments() -> list[tuple[str, str]]:
    """[(experiment name, page)] the link may open, in order: the demo's, then the labs'."""
    found = []
    for overrides in (["profile=demo"], []):
        tracking = compose(overrides).tracking
        found.append((tracking.experiment_name, tracking.page))
    return found


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run `mlflow ui` until Ctrl-C or SIGTERM; print the link to the story when it is up."""
    parser = argparse.ArgumentParser("python -m dlilabs.ui", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=5000, help="default 5000")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stop the server too, not only this process
    store = Path(store_root()).resolve()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    base = f"http://127.0.0.1:{args.port}"
    try:
        check_port_free(args.port)
        experiment_id = landing(uri, experiments())
        command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
        command += ["--default-artifact-root", (store / "mlartifacts").as_uri()]
        # One worker (it serves from a thread pool): with MLflow's default of several,
        # uvicorn restarts every worker a busy machine keeps from answering its 5 s ping.
        command += ["--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]
        print(f"Starting the MLflow UI over {store / 'mlflow.db'} ...", flush=True)
        process = subprocess.Popen(command, start_new_session=True)
        try:
            wait_healthy(base, process, None, timeout=180)
            print(f"\nMLflow UI: {runs_url(base, experiment_id)}\nCtrl-C stops it.", flush=True)
            process.wait()
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # the server and its workers
                process.wait(timeout=30)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
