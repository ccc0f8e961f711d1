"""Helpers of the S3 tests: moto's S3 server on 127.0.0.1, a team tracking server whose
artifacts live in it, and the environments of the two sides (only the server holds the
bucket's credentials)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dlilabs.tracking import teamserver

# Distinctive values, so that a test can look for them in `ps` and in git.
KEY_ID = "TEAMKEYID0123456789"
SECRET = "team-secret-7f3a9c2e51d84b06a"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
# What a client must not have: then the server alone can reach the bucket.
S3_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "MLFLOW_S3_ENDPOINT_URL",
)  # fmt: skip


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    """Wait until something listens on 127.0.0.1:`port`; fail if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited ({process.returncode})"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass
class Moto:
    """moto's S3 server, in its own process (`moto_server`), on a free port of 127.0.0.1."""

    port: int
    process: subprocess.Popen
    users: dict[str, tuple[str, str]] = field(default_factory=dict)  # with auth: IAM keys

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def credentials(self) -> dict[str, str]:
        """AWS_* variables of a user allowed everything (with auth: `admin`)."""
        key_id, secret = self.users.get("admin", (KEY_ID, SECRET))
        return {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}

    def client(self, user: str = "admin"):
        import boto3

        key_id, secret = self.users.get(user, (KEY_ID, SECRET))
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            region_name="us-east-1",
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key of `bucket` under `prefix`."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [
            item["Key"]
            for page in pages
            for item in page.get("Contents", [])
            if item["Key"].startswith(prefix)
        ]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(20)


def start_moto(
    *buckets: str, log: Path | None = None, auth: bool = False, port: int | None = None
) -> Moto:
    """Start moto's S3 server and create `buckets` in it. With `auth`, moto checks every
    request's credentials and IAM policy, as AWS does: the first requests (unchecked) make
    the users `admin` and `server` with keys, both allowed everything; `moto.users` holds
    their (key id, secret). `port`: a given one (a restart), else a free one."""
    port = port or teamserver.free_port()
    command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "6" if auth else "inf"}
    with open(log or os.devnull, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, start_new_session=True, env=env)
    moto = Moto(port, process)
    try:
        wait_for_port(port, process)
        if auth:
            moto.users = {name: make_user(moto, name) for name in ("admin", "server")}
        for bucket in buckets:
            moto.client().create_bucket(Bucket=bucket)
    except BaseException:
        moto.stop()
        raise
    return moto


ALLOW_ALL = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}


def iam(moto: Moto, user: str = "admin"):
    import boto3

    key_id, secret = moto.users.get(user, (KEY_ID, SECRET))
    return boto3.client(
        "iam",
        endpoint_url=moto.endpoint,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        region_name="us-east-1",
    )


def make_user(moto: Moto, name: str) -> tuple[str, str]:
    """An IAM user `name` allowed everything (3 requests); returns its key id and secret."""
    client = iam(moto, name)
    client.create_user(UserName=name)
    client.put_user_policy(UserName=name, PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
    key = client.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def server_env(moto: Moto) -> dict[str, str]:
    """The tracking server's own variables: the bucket's endpoint and credentials."""
    return {
        **CREDENTIALS,
        "MLFLOW_S3_ENDPOINT_URL": moto.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        # boto3 tries a dead store 5 times with backoff, per file: a test need not wait.
        "AWS_MAX_ATTEMPTS": "2",
    }


@dataclass
class Team:
    """PostgreSQL + `mlflow server` keeping its artifacts in `artifacts` (an s3:// URI)."""

    folder: Path
    postgres: teamserver.Postgres
    port: int
    process: subprocess.Popen

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_team(moto: Moto, artifacts: str) -> Team:
    """A team tracking server over a throwaway PostgreSQL, its artifacts in moto's `artifacts`.
    Its folder is world-enterable: as root, PostgreSQL runs as another user."""
    folder = Path(tempfile.mkdtemp(prefix="dlilabs-s3-server-"))
    folder.chmod(0o755)
    postgres = teamserver.start_postgres(folder)
    try:
        port = teamserver.free_port()
        process = teamserver.start_mlflow(
            postgres, artifacts, port, log_file=folder / "mlflow.log", env=server_env(moto)
        )
    except BaseException:
        teamserver.stop(postgres=postgres)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return Team(folder, postgres, port, process)


def stop_team(team: Team) -> None:
    teamserver.stop(team.process, team.postgres)
    shutil.rmtree(team.folder, ignore_errors=True)


def client_env(root: Path, uri: str | None = None, **extra: str) -> dict[str, str]:
    """A stage's environment in the project at `root`, logging to `uri`, with no S3
    credentials or endpoint at all: what a workstation or cluster node of the team has."""
    env = {key: value for key, value in os.environ.items() if key not in S3_VARIABLES}
    for key in ("MLFLOW_TRACKING_URI", "DLILABS_STORE_DIR", "DVC_STAGE"):
        env.pop(key, None)
    env.update(DLILABS_ROOT=str(root), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    env.update(extra)
    return env


def run(cwd: Path, env: dict, *command: str, check: bool = True, timeout: float = 900):
    """Run `command` in `cwd`; with `check`, fail the test with its output unless it exits 0."""
    result = subprocess.run(
        list(command), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL `process` and its children (it was started in a session of its own)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
