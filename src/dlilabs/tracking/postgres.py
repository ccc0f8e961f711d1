"""The team server's PostgreSQL: a cluster of its own in `<data-dir>/postgres`, locked down.

Every connection needs a password (scram-sha-256, over 127.0.0.1 or the unix socket inside the
cluster folder; nothing else listens). Two roles, with generated passwords kept in 0600 files
in the data dir:

    postgres.password   the bootstrap superuser `postgres` (owned by the cluster's OS user)
    mlflow.pgpass       the role `mlflow`, in libpq's password-file format: it owns the
                        `mlflow` database and nothing else, and is not a superuser, so it
                        cannot run programs (COPY ... TO PROGRAM) or read the server's files.

MLflow connects as `mlflow` with PGPASSFILE pointing at mlflow.pgpass, so no password is on a
command line. A cluster made by an older dlilabs.server (`initdb -A trust`, superuser `mlflow`)
is upgraded in place on its next start, keeping every run.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dlilabs.ground.errors import UserError

SUPERUSER = "postgres"
ROLE = DATABASE = "mlflow"
SUPERUSER_FILE, ROLE_FILE = "postgres.password", "mlflow.pgpass"
INSTALL_HINT = "apt-get install -y postgresql (.ci/run does it)"
HBA = """\
# Written by dlilabs.server at every start: every connection needs a password.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 scram-sha-256
host    all       all   127.0.0.1/32  scram-sha-256
"""
# What the MLflow role may not do: it owns its database, nothing more.
LIMITS = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
# Upgrade: hand the tables of an old cluster (owned by its bootstrap superuser) to ROLE.
# Sequences owned by a column follow their table; changing them directly is an error.
TAKE_OVER = f"""
DO $$
DECLARE item record;
BEGIN
  FOR item IN
    SELECT format('ALTER %s %s OWNER TO {ROLE}',
                  CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                                 WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END,
                  c.oid::regclass) AS sql
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
      AND NOT EXISTS (SELECT 1 FROM pg_depend d
                      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                        AND d.deptype IN ('a', 'i'))
    UNION ALL
    SELECT format('ALTER TYPE %s OWNER TO {ROLE}', t.oid::regtype)
    FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
    WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd')
  LOOP
    EXECUTE item.sql;
  END LOOP;
END $$"""


@dataclass
class Postgres:
    """A running cluster: the postmaster, its folder, port, the DSN MLflow uses (no password
    in it) and the libpq password file that completes it (set PGPASSFILE to it)."""

    process: subprocess.Popen
    cluster: Path
    port: int
    dsn: str
    passfile: Path


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


def tail(path: Path, lines: int = 15) -> str:
    """The end of a log file, for error messages."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def private_file(path: Path, text: str, run_as: dict | None = None) -> None:
    """Write `text` to `path`, readable by its owner only (0600) from the first byte; owned by
    the `run_as` user when given (the cluster's files), else by us."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(text)
    if run_as:
        os.chown(temporary, run_as["user"], run_as["group"])
    os.replace(temporary, path)


def password(path: Path, line: str = "{}", run_as: dict | None = None) -> str:
    """The password kept in `path`, a 0600 file whose one line is `line` filled with it;
    generated (secrets.token_urlsafe: no ':' or '\\') the first time."""
    if not path.exists():
        private_file(path, line.format(secrets.token_urlsafe(24)) + "\n", run_as)
    if path.stat().st_mode & 0o077:  # libpq ignores a password file others can read
        raise UserError(f"{path} is readable by others; `chmod 600 {path}` and start again")
    return path.read_text().strip().rsplit(":", 1)[-1]


def _launch(cluster: Path, port: int, listen: str, run_as: dict) -> subprocess.Popen:
    """Start the postmaster on `cluster`: TCP on `listen` ('' for none), socket in the cluster
    folder (0700: only its owner and root reach it). Its own session: a Ctrl-C in the terminal
    reaches only us, and we stop MLflow first. A second postmaster on the folder, or a taken
    port, fails with the reason in the log."""
    options = ["-c", f"listen_addresses={listen}", "-c", f"unix_socket_directories={cluster}"]
    options += ["-c", "password_encryption=scram-sha-256"]
    command = [postgres_bin("postgres"), "-D", str(cluster), "-p", str(port), *options]
    with open(cluster.parent / "postgres.log", "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True, **run_as)


def _connect(process: subprocess.Popen, cluster: Path, timeout: float, **params):
    """A psycopg2 connection (autocommit) to the starting postmaster, retried until `timeout`."""
    import psycopg2

    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = psycopg2.connect(connect_timeout=5, **params)
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            return connection
        except psycopg2.OperationalError as error:
            refused = "password authentication failed" in str(error)
            if refused or process.poll() is not None or time.monotonic() > deadline:
                end(process, signal.SIGINT)
            if refused:  # PostgreSQL keeps only a hash: the file is the only copy
                raise UserError(
                    f"PostgreSQL refused the password of {params['user']!r} in "
                    f"{cluster.parent / SUPERUSER_FILE}; put back the file it was made with"
                ) from None
            if process.poll() is not None or time.monotonic() > deadline:
                log = tail(cluster.parent / "postgres.log")
                raise UserError(f"PostgreSQL did not start:\n{log}") from None
            time.sleep(0.2)


def _set_password(cursor, role: str, secret: str) -> None:
    """Give `role` the password `secret`, sending only its SCRAM verifier (no plain text in
    the server's statement log)."""
    from psycopg2.extensions import encrypt_password

    verifier = encrypt_password(secret, role, cursor.connection, "scram-sha-256")
    cursor.execute(f"ALTER ROLE {role} PASSWORD %s", (verifier,))


def _upgrade(cluster: Path, run_as: dict, super_password: str, timeout: float) -> None:
    """Secure a cluster made by the older dlilabs.server (trust for everyone, bootstrap
    superuser `mlflow` owning the tables): rename that superuser `postgres`, give it a password,
    and hand the tables to a new `mlflow` role (made by `_secure`). The cluster listens on its
    private socket only meanwhile."""
    process = _launch(cluster, free_port(), "", run_as)
    port = int(process.args[process.args.index("-p") + 1])
    params = dict(host=str(cluster), port=port, dbname=DATABASE)
    try:
        with contextlib.closing(_connect(process, cluster, timeout, user=ROLE, **params)) as old:
            old.cursor().execute("DROP ROLE IF EXISTS dlilabs_upgrade")  # a crashed upgrade's
            old.cursor().execute("CREATE ROLE dlilabs_upgrade SUPERUSER LOGIN")
        upgrader = _connect(process, cluster, timeout, user="dlilabs_upgrade", **params)
        upgrader.autocommit = False  # all or nothing: a crash leaves the old cluster as it was
        with contextlib.closing(upgrader), upgrader, upgrader.cursor() as cursor:
            cursor.execute(f"ALTER ROLE {ROLE} RENAME TO {SUPERUSER}")  # the bootstrap role
            _set_password(cursor, SUPERUSER, super_password)
            cursor.execute(f"CREATE ROLE {ROLE} {LIMITS}")
            cursor.execute(TAKE_OVER)
            cursor.execute(f"ALTER DATABASE {DATABASE} OWNER TO {ROLE}")
        with contextlib.closing(_connect(process, cluster, timeout, user=SUPERUSER, **params)) as c:
            c.cursor().execute("DROP ROLE dlilabs_upgrade")
    finally:
        end(process, signal.SIGINT)


def _secure(connection, role_password: str) -> None:
    """Make the `mlflow` role (or bring an existing one back to) a non-superuser with the
    password from its file, owning the `mlflow` database, which nobody else may connect to."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,))
        cursor.execute(f"{'ALTER' if cursor.fetchone() else 'CREATE'} ROLE {ROLE} {LIMITS}")
        _set_password(cursor, ROLE, role_password)
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
        if cursor.fetchone() is None:
            cursor.execute(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        cursor.execute(f"ALTER DATABASE {DATABASE} OWNER TO {ROLE}")
        cursor.execute(f"REVOKE ALL ON DATABASE {DATABASE} FROM PUBLIC")


def start_postgres(data_dir: str | os.PathLike, port: int | None = None, timeout=60) -> Postgres:
    """Start (initialising or upgrading on first use) the cluster in `<data_dir>/postgres`,
    listening on 127.0.0.1:`port` (default: a free one) and a socket in that folder, with
    password authentication for everyone; create the `mlflow` role and database."""
    data_dir = Path(data_dir).resolve()
    cluster = data_dir / "postgres"
    cluster.mkdir(parents=True, exist_ok=True)
    cluster.chmod(0o700)  # PostgreSQL insists
    run_as = _run_as(cluster)
    super_password = password(data_dir / SUPERUSER_FILE, run_as=run_as)  # initdb reads it
    passfile = data_dir / ROLE_FILE
    role_password = password(passfile, f"127.0.0.1:*:{DATABASE}:{ROLE}:{{}}")
    hba = cluster / "pg_hba.conf"
    if not (cluster / "PG_VERSION").exists():  # else reuse it: runs outlive the server
        options = ["-U", SUPERUSER, "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"]
        initdb = [postgres_bin("initdb"), "-D", str(cluster), *options]
        initdb.append(f"--pwfile={data_dir / SUPERUSER_FILE}")
        done = subprocess.run(initdb, capture_output=True, text=True, **run_as)
        if done.returncode:
            raise UserError(f"initdb failed in {cluster}:\n{done.stderr.strip()}")
    elif any(line.split()[-1:] == ["trust"] for line in hba.read_text().splitlines()):
        print(f"securing {cluster}: it let every local user in as a superuser")
        _upgrade(cluster, run_as, super_password, timeout)
    private_file(hba, HBA, run_as)
    port = port or free_port()
    process = _launch(cluster, port, "127.0.0.1", run_as)
    dsn = f"postgresql+psycopg2://{ROLE}@127.0.0.1:{port}/{DATABASE}"
    params = dict(host="127.0.0.1", port=port, dbname="postgres", user=SUPERUSER)
    connection = _connect(process, cluster, timeout, password=super_password, **params)
    with contextlib.closing(connection):
        _secure(connection, role_password)
    return Postgres(process, cluster, port, dsn, passfile)


def end(process: subprocess.Popen, sig: int, group=False, timeout: float = 30) -> None:
    """Send `sig` (to the whole group if `group`), wait, and SIGKILL what is left.
    PostgreSQL takes SIGINT: a fast but clean shutdown (SIGTERM waits for every client)."""

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
