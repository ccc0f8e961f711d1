"""`python -m dlilabs.remote push|pull|check`: the team's DVC remote, checked first.

    python -m dlilabs.remote check              # does the default remote's bucket answer?
    python -m dlilabs.remote push               # check, then `dvc push`
    python -m dlilabs.remote pull -r team       # check remote `team`, then `dvc pull -r team`

`dvc push` and `dvc pull` report a missing bucket, refused credentials or an unreachable
endpoint in boto3's words (the bucket unnamed, or after a minute of retries). This checks the
remote's bucket first (dlilabs.tracking.buckets: its url, endpointurl and credentials from
.dvc/config and .dvc/config.local) and stops with one line naming the remote, the bucket and
what to check, exit code 2. Arguments after the command go to DVC unchanged. Remotes that
are not on S3 are not checked.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from dlilabs.ground.config import project_root
from dlilabs.ground.errors import UserError


def remote_of(dvc_args: list[str]) -> str | None:
    """The remote named by `-r NAME` / `--remote NAME` / `--remote=NAME` in `dvc_args`."""
    for index, arg in enumerate(dvc_args):
        if arg in ("-r", "--remote") and index + 1 < len(dvc_args):
            return dvc_args[index + 1]
        if arg.startswith("--remote="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlilabs.remote", description=__doc__.split("\n")[0].split(": ", 1)[1]
    )
    parser.add_argument("command", choices=["check", "push", "pull"])
    parser.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed on to dvc")
    args = parser.parse_args(argv)
    from dlilabs.tracking.buckets import bucket_problem, dvc_bucket

    try:
        bucket = dvc_bucket(project_root(), remote_of(args.dvc_args))
        problem = bucket_problem(bucket) if bucket else None
    except UserError as error:
        problem = str(error)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.command == "check":
        print(f"{bucket.name}: {bucket.uri} answers" if bucket else "not an S3 remote: unchecked")
        return 0
    dvc = [sys.executable, "-m", "dvc", args.command, *args.dvc_args]
    return subprocess.run(dvc, cwd=project_root(), check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
