"""Team tracking server: a throwaway PostgreSQL cluster and an MLflow server in one folder.

`python -m dlilabs.server [--port 5001] [--data-dir build/server]` (or `make server`) starts
Debian's PostgreSQL on 127.0.0.1 and a unix socket inside `<data-dir>/postgres`, then
`mlflow server` with that database as its backend store and `<data-dir>/artifacts` as the
artifact store it proxies, and stops both on Ctrl-C or SIGTERM. Runs log to it with
`tracking=server` (conf/tracking/server.yaml). The folder survives restarts: the next start
reuses the cluster, so runs and artifacts stay together.

The client side (fail fast when the server is gone, one clear line when it is) is in
`dlilabs.tracking.store`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dlilabs.errors import UserError

DB_USER = DB_NAME = "mlflow"
INSTALL_HINT = "apt-get install -y postgresql (.ci/run does it)"


@dataclass
class Postgres:
    """A running cluster: the postmaster process, its folder, port and SQLAlchemy DSN."""

    process: subprocess.Popen
    cluster: Path
    port: int
    dsn: str


def _version(program: Path) -> int:
    """The major version in /usr/lib/postgresql/<version>/bin/<program>."""
    return int(program.parts[-3]) if program.parts[-3].isdigit() else 0


def postgres_bin(name: str) -> str:
    """Path of a PostgreSQL program, from the newest /usr/lib/postgresql/<version>/bin
    (Debian keeps initdb and postgres off the PATH), else the PATH (Homebrew, other distros)."""
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=_version)
    program = str(found[-1]) if found else shutil.which(name)
    if program is None:
        raise UserError(f"PostgreSQL's {name} is missing; install it: {INSTALL_HINT}")
    return program


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


def _run_as(cluster: Path) -> dict:
    """Popen arguments that drop root: PostgreSQL refuses to run as root. As root, the cluster
    belongs to the `postgres` user (Debian's package creates it), else to `nobody`."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam(name)
            break
    else:
        raise UserError("no `postgres` or `nobody` user to run PostgreSQL as")
    for folder in cluster.parents:  # that user must be able to walk down to the cluster
        if folder.stat().st_uid != user.pw_uid and not folder.stat().st_mode & 0o001:
            raise UserError(
                f"PostgreSQL runs as user {user.pw_name!r}, which cannot enter "
                f"{folder}; pick a --data-dir it can reach (e.g. under /tmp)"
            )
    os.chown(cluster, user.pw_uid, user.pw_gid)
    env = {**os.environ, "HOME": user.pw_dir, "USER": user.pw_name}
    # cwd: the postgres user may not be allowed into ours, and initdb looks it up.
    return dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd=cluster, env=env)


def _tail(path: Path, lines: int = 15) -> str:
    """The end of a log file, for error messages."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def start_postgres(data_dir: str | os.PathLike, port: int | None = None, timeout=60) -> Postgres:
    """Start (initialising on first use) the cluster in `<data_dir>/postgres`, listening on
    127.0.0.1:`port` (default: a free one) and a socket in that folder; create the database.
    Authentication is `trust`: the MLflow server in front of it has no login either."""
    import psycopg2

    cluster = Path(data_dir).resolve() / "postgres"
    cluster.mkdir(parents=True, exist_ok=True)
    cluster.chmod(0o700)  # PostgreSQL insists
    run_as = _run_as(cluster)
    log_file = cluster.parent / "postgres.log"
    if not (cluster / "PG_VERSION").exists():  # else reuse it: runs outlive the server
        options = ["-U", DB_USER, "-A", "trust", "-E", "UTF8", "--locale=C"]
        initdb = [postgres_bin("initdb"), "-D", str(cluster), *options]
        done = subprocess.run(initdb, capture_output=True, text=True, **run_as)
        if done.returncode:
            raise UserError(f"initdb failed in {cluster}:\n{done.stderr.strip()}")
    port = port or free_port()
    options = ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={cluster}"]
    command = [postgres_bin("postgres"), "-D", str(cluster), "-p", str(port), *options]
    # Its own session: a Ctrl-C in the terminal reaches only us, and we stop MLflow first.
    # A second postmaster on the folder, or a taken port, fails with the reason in the log.
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=log, start_new_session=True, **run_as
        )
    dsn = f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{port}/{DB_NAME}"
    handle = Postgres(process, cluster, port, dsn)
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = psycopg2.connect(
                host="127.0.0.1", port=port, user=DB_USER, dbname="postgres", connect_timeout=5
            )
            break
        except psycopg2.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop(postgres=handle)
                raise UserError(f"PostgreSQL did not start:\n{_tail(log_file)}") from None
            time.sleep(0.2)
    with contextlib.closing(connection):
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
            if cursor.fetchone() is None:
                cursor.execute(f"CREATE DATABASE {DB_NAME}")
    return handle


def wait_healthy(url: str, process: subprocess.Popen, log_file: Path | None, timeout=120) -> None:
    """Wait until `url`/health answers OK; fail if `process` exits or `timeout` passes.
    (The first start creates the schema, which takes several seconds.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = _tail(log_file) if log_file else ""
            raise UserError(f"the MLflow server exited ({process.returncode}):\n{tail}")
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                return
        time.sleep(0.5)
    raise UserError(f"the MLflow server at {url} did not answer /health in {timeout:.0f} s")


def start_mlflow(dsn: str, artifacts, port: int, workers=1, log_file: Path | None = None):
    """Start `mlflow server` on 127.0.0.1:`port` over the database `dsn`, storing artifacts in
    `artifacts` (a folder or an s3://... URI) and serving them to clients; wait for /health.
    It runs in its own process group: `stop` (or a test's os.killpg) reaches its workers.
    One worker by default: it serves requests from a thread pool, and with more, uvicorn's
    supervisor restarts any worker a busy machine keeps from answering its 5 s health ping."""
    check_port_free(port)
    if "://" not in str(artifacts):
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        artifacts = Path(artifacts).resolve()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", dsn]
    command += ["--artifacts-destination", str(artifacts), "--serve-artifacts"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    with open(log_file or os.devnull, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, log_file)
    except BaseException:
        stop(process)
        raise
    return process


def _end(process: subprocess.Popen, sig: int, group: bool, timeout: float) -> None:
    """Send `sig` (to the whole group if `group`), wait, and SIGKILL what is left."""

    def send(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signum) if group else process.send_signal(signum)

    if process.poll() is None:
        send(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            process.wait(10)
    if group:  # the leader may be gone while its workers still hold the port
        send(signal.SIGKILL)


def stop(mlflow: subprocess.Popen | None = None, postgres: Postgres | None = None, timeout=30):
    """Stop the MLflow server (SIGTERM to its group), then PostgreSQL (SIGINT: a fast but
    clean shutdown; SIGTERM would wait for every client to leave)."""
    if mlflow is not None:
        _end(mlflow, signal.SIGTERM, group=True, timeout=timeout)
    if postgres is not None:
        _end(postgres.process, signal.SIGINT, group=False, timeout=timeout)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`python -m dlilabs.server`: run PostgreSQL + MLflow until Ctrl-C or SIGTERM."""
    from dlilabs.config import project_root

    parser = argparse.ArgumentParser("python -m dlilabs.server", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=5001, help="MLflow port (default 5001)")
    default_dir = project_root() / "build" / "server"
    parser.add_argument("--data-dir", type=Path, default=default_dir, help="default build/server")
    parser.add_argument("--artifacts", help="default <data-dir>/artifacts; or s3://bucket/path")
    parser.add_argument("--pg-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--workers", type=int, default=1, help="MLflow server processes")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # stop cleanly under kill, systemd, SLURM too
    data_dir = args.data_dir.resolve()
    postgres = process = None
    log_file, uri = data_dir / "mlflow.log", f"http://127.0.0.1:{args.port}"
    try:
        postgres = start_postgres(data_dir, args.pg_port)
        print(f"PostgreSQL on 127.0.0.1:{postgres.port} (log: {data_dir / 'postgres.log'})")
        process = start_mlflow(
            postgres.dsn,
            args.artifacts or data_dir / "artifacts",
            args.port,
            args.workers,
            log_file,
        )
        print(f"MLflow tracking server on {uri} (log: {log_file})", flush=True)
        print(f"Log to it with `tracking=server`, or: export MLFLOW_TRACKING_URI={uri}", flush=True)
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
