"""Team tracking server: a locked-down PostgreSQL cluster and an MLflow server in one folder.

`python -m dlilabs.server [--port 5001] [--data-dir .server] [--auth]` (or `make server`)
starts PostgreSQL (`dlilabs.tracking.postgres`: passwords for everyone, 127.0.0.1 and a socket
in `<data-dir>/postgres` only), then `mlflow server` with that database as its backend store
and `<data-dir>/artifacts` as the artifact store it proxies, and stops both on Ctrl-C or
SIGTERM. `--artifacts s3://bucket/prefix` keeps the artifacts in a bucket instead (endpoint
from MLFLOW_S3_ENDPOINT_URL, credentials from AWS_* or ~/.aws; the bucket is checked first).
Runs log to it with `tracking=server` (conf/tracking/server.yaml). The folder survives
restarts: the next start reuses the cluster, so runs and artifacts stay together.

`--auth` puts MLflow's own login in front (`--app-name basic-auth`): its config, user store,
admin password and session key are 0600 files in the data dir (AUTH_FILES); clients send
MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.

The client side (fail fast when the server is gone, one clear line when it is) is in
`dlilabs.tracking.store`.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dlilabs.ground.errors import UserError
from dlilabs.tracking.buckets import AWS, check_bucket, server_bucket
from dlilabs.tracking.postgres import (
    SUPERUSER_FILE,
    Postgres,
    end,
    free_port,
    password,
    private_file,
    start_postgres,
    tail,
)
from dlilabs.tracking.uiview import landing, runs_url

__all__ = ["Postgres", "free_port", "start_postgres", "start_mlflow", "stop", "main"]
ADMIN = "admin"
AUTH_FILES = {
    "config": "mlflow-auth.ini",  # MLflow's basic_auth.ini (MLFLOW_AUTH_CONFIG_PATH)
    "users": "mlflow-auth.db",  # its users and permissions (SQLite)
    "admin": "mlflow-admin.password",  # the first password of user `admin`
    "key": "mlflow-auth.key",  # signs its CSRF tokens (MLFLOW_FLASK_SERVER_SECRET_KEY)
}
# Every user may log runs to any experiment and register models (a team shares `dlilabs`);
# only admins manage users. Edit default_permission in mlflow-auth.ini to change it.
DEFAULT_PERMISSION = "EDIT"


def check_port_free(port: int) -> None:
    """Fail clearly when `port` is taken: else a health check could answer from another server."""
    with socket.socket() as probe:
        # SO_REUSEADDR: a killed server's TIME_WAIT connections must not count, a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            raise UserError(
                f"port {port} on 127.0.0.1 is in use ({error.strerror}); "
                "stop the other server or pick another --port"
            ) from error


def wait_healthy(url: str, process: subprocess.Popen, log_file: Path | None, timeout=120) -> None:
    """Wait until `url`/health answers OK; fail if `process` exits or `timeout` passes.
    (The first start creates the schema, which takes several seconds.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = tail(log_file) if log_file else ""
            raise UserError(f"the MLflow server exited ({process.returncode}):\n{log}")
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                return
        time.sleep(0.5)
    raise UserError(f"the MLflow server at {url} did not answer /health in {timeout:.0f} s")


def auth_env(data_dir: Path) -> dict[str, str]:
    """The environment that turns MLflow's basic-auth app on with every file in `data_dir`
    (AUTH_FILES, 0600): a config pointing at the user store, the admin's first password
    (generated; MLflow ignores it once the admin exists) and the key of its CSRF tokens."""
    config, users = data_dir / AUTH_FILES["config"], data_dir / AUTH_FILES["users"]
    permission = DEFAULT_PERMISSION
    if config.exists():  # keep what the team chose
        kept = configparser.ConfigParser()
        kept.read(config)
        permission = kept.get("mlflow", "default_permission", fallback=permission)
    if not users.exists():  # SQLite keeps an empty file's mode, and gives it to its journals
        private_file(users, "")
    text = f"[mlflow]\ndefault_permission = {permission}\ndatabase_uri = sqlite:///{users}\n"
    private_file(config, text + f"admin_username = {ADMIN}\n")
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password(data_dir / AUTH_FILES["admin"]),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": password(data_dir / AUTH_FILES["key"]),
    }


def start_mlflow(
    postgres: Postgres,
    artifacts,
    port: int,
    workers=1,
    log_file: Path | None = None,
    auth: bool = False,
    env: dict[str, str] | None = None,
):
    """Start `mlflow server` on 127.0.0.1:`port` over `postgres`'s database, storing artifacts
    in `artifacts` (a folder or an s3://... URI) and serving them to clients; with `auth`,
    behind MLflow's login (files beside the cluster); wait for /health. `env`: variables for
    the server alone, such as the bucket's credentials (AWS_*) and MLFLOW_S3_ENDPOINT_URL.
    The database password reaches it through PGPASSFILE, not its command line (`ps` shows it).
    It runs in its own process group: `stop` (or a test's os.killpg) reaches its workers.
    One worker by default: it serves requests from a thread pool, and with more, uvicorn's
    supervisor restarts any worker a busy machine keeps from answering its 5 s health ping."""
    check_port_free(port)
    if "://" not in str(artifacts):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = Path(artifacts).resolve()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres.dsn]
    command += ["--artifacts-destination", str(artifacts), "--serve-artifacts"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    env = {**os.environ, **(env or {}), "PGPASSFILE": str(postgres.passfile)}
    env.pop("PGPASSWORD", None)  # would win over the file
    if auth:
        command += ["--app-name", "basic-auth"]
        env.update(auth_env(postgres.cluster.parent))
    with open(log_file or os.devnull, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True, env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log_file)
    except BaseException:
        stop(process)
        raise
    return process


def stop(mlflow: subprocess.Popen | None = None, postgres: Postgres | None = None, timeout=30):
    """Stop the MLflow server (SIGTERM to its group), then PostgreSQL (SIGINT: a fast but
    clean shutdown; SIGTERM would wait for every client to leave)."""
    if mlflow is not None:
        end(mlflow, signal.SIGTERM, group=True, timeout=timeout)
    if postgres is not None:
        end(postgres.process, signal.SIGINT, timeout=timeout)


def labs_experiment(uri: str) -> str | None:
    """The id of the labs' experiment (conf/tracking/server.yaml) on the server at `uri`,
    prepared for the UI; None when it is not there yet or the server wants a login."""
    from dlilabs.ground.config import compose

    tracking = compose(["tracking=server"]).tracking
    try:
        return landing(uri, [(tracking.experiment_name, tracking.page)])
    except Exception:  # a login (--auth) or a new server: the link opens the experiment list
        return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`python -m dlilabs.server`: run PostgreSQL + MLflow until Ctrl-C or SIGTERM."""
    from dlilabs.ground.config import project_root

    parser = argparse.ArgumentParser("python -m dlilabs.server", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=5001, help="MLflow port (default 5001)")
    default_dir = project_root() / ".server"  # not in build/: `make clean` removes that
    parser.add_argument("--data-dir", type=Path, default=default_dir, help="default .server")
    parser.add_argument("--artifacts", help="default <data-dir>/artifacts; or s3://bucket/path")
    parser.add_argument("--pg-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--workers", type=int, default=1, help="MLflow server processes")
    parser.add_argument(
        "--auth", action="store_true", help="MLflow's login (user admin, password in the data dir)"
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stop cleanly under kill, systemd, SLURM too
    data_dir = args.data_dir.resolve()
    postgres = process = None
    log_file, uri = data_dir / "mlflow.log", f"http://127.0.0.1:{args.port}"
    try:
        if args.artifacts and "://" in args.artifacts:
            endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
            check_bucket(server_bucket(args.artifacts, endpoint))  # before anything starts
            print(f"artifacts in {args.artifacts} at {endpoint or AWS}", flush=True)
        postgres = start_postgres(data_dir, args.pg_port)
        print(f"PostgreSQL on 127.0.0.1:{postgres.port} (log: {data_dir / 'postgres.log'})")
        print(f"  passwords: {postgres.passfile} (MLflow's role), {data_dir / SUPERUSER_FILE}")
        artifacts = args.artifacts or data_dir / "artifacts"
        process = start_mlflow(postgres, artifacts, args.port, args.workers, log_file, args.auth)
        print(f"MLflow tracking server on {uri} (log: {log_file})", flush=True)
        print(f"  in a browser: {runs_url(uri, labs_experiment(uri))}", flush=True)
        print(f"Log to it with `tracking=server`, or: export MLFLOW_TRACKING_URI={uri}", flush=True)
        if args.auth:
            admin = data_dir / AUTH_FILES["admin"]
            print(f"Login: user {ADMIN}, first password in {admin}; clients export", flush=True)
            print(f"  MLFLOW_TRACKING_USERNAME={ADMIN} MLFLOW_TRACKING_PASSWORD=$(cat {admin})")
        print("Ctrl-C stops it.", flush=True)
        process.wait()
        raise UserError(f"the MLflow server exited ({process.returncode}); see {log_file}")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopping the MLflow server and PostgreSQL")
        return 0
    finally:
        # A second Ctrl-C must not leave PostgreSQL half-stopped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop(process, postgres)


if __name__ == "__main__":
    sys.exit(main())
