"""S3 buckets of a team's two stores: one clear line when one cannot be used.

`bucket_problem(Bucket(...))` asks the bucket once (HeadBucket) and returns None when it
answers, else one line naming the bucket, its endpoint and what to check: the endpoint is
unreachable, there are no credentials or they are refused, or the bucket does not exist.
`server_bucket` describes the tracking server's artifact store (`dlilabs.server --artifacts
s3://...`: endpoint MLFLOW_S3_ENDPOINT_URL, credentials boto3's usual AWS_* or ~/.aws);
`dvc_bucket` a DVC remote (its url, endpointurl and credentials from .dvc/config and
.dvc/config.local). MLflow and DVC would otherwise fail later, each upload deep in a job,
with boto3's words and a minute of retries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from dlilabs.ground.errors import UserError

AWS = "https://s3.amazonaws.com"  # where boto3 goes when no endpoint is given (for messages)
REFUSED = {"403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "Forbidden"}
MISSING = {"404", "NoSuchBucket", "NotFound"}


@dataclass(frozen=True)
class Bucket:
    """An S3 location `uri` (s3://bucket/prefix) as one tool reaches it: `endpoint` (None:
    AWS), explicit `credentials` (boto3 keyword arguments; empty: boto3's own lookup), and
    where the user sets the endpoint and the credentials (for the messages)."""

    uri: str
    name: str  # "the tracking server's artifact store", "DVC remote 'team'"
    endpoint: str | None = None
    credentials: dict = field(default_factory=dict)
    set_endpoint: str = "MLFLOW_S3_ENDPOINT_URL"
    set_credentials: str = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or ~/.aws/credentials)"
    set_uri: str = "--artifacts"


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix"); a UserError for anything else."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UserError(f"{uri!r} is not an S3 location: write s3://bucket/prefix")
    return parsed.netloc, parsed.path.strip("/")


def s3_client(endpoint: str | None, credentials: dict | None = None, timeout: float = 10):
    """A boto3 S3 client for `endpoint` (None: AWS) that gives up quickly: a store that does not
    answer should fail a check in seconds, not after boto3's retries."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as error:
        raise UserError(
            "S3 needs boto3 and dvc-s3: pip install -e '.[team]' (make team)"
        ) from error
    config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1})
    credentials = dict(credentials or {})
    session = boto3.Session(profile_name=credentials.pop("profile_name", None))
    return session.client("s3", endpoint_url=endpoint or None, config=config, **credentials)


def bucket_problem(bucket: Bucket) -> str | None:
    """None when the bucket of `bucket.uri` answers; else one line: what is wrong, what to check."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    name, _ = split_s3(bucket.uri)
    endpoint = bucket.endpoint or AWS
    where = f"{bucket.name} {bucket.uri} at {endpoint}"
    try:
        s3_client(bucket.endpoint, bucket.credentials).head_bucket(Bucket=name)
    except EndpointConnectionError:
        return (
            f"cannot reach the S3 endpoint of {where}: is the object store running, and is "
            f"{bucket.set_endpoint} right?"
        )
    except (NoCredentialsError, PartialCredentialsError, ProfileNotFound) as error:
        return f"no S3 credentials for {where} ({error}): set {bucket.set_credentials}"
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in MISSING:
            return (
                f"the bucket {name!r} of {where} does not exist: create it "
                f"(aws s3 mb s3://{name}) or fix {bucket.set_uri}"
            )
        if code in REFUSED:
            return (
                f"S3 refused the credentials for {where} ({code}): check "
                f"{bucket.set_credentials}, and that they may use bucket {name!r}"
            )
        return f"S3 answered {code or error} for {where}"
    return None


def check_bucket(bucket: Bucket) -> None:
    """Raise a UserError (the line of `bucket_problem`) when `bucket` cannot be used."""
    problem = bucket_problem(bucket)
    if problem:
        raise UserError(problem)


def server_bucket(uri: str, endpoint: str | None) -> Bucket:
    """The tracking server's artifact store `uri`, as `mlflow server` reaches it."""
    return Bucket(uri, "the tracking server's artifact store", endpoint)


def dvc_bucket(root: Path, remote: str | None = None) -> Bucket | None:
    """The DVC remote `remote` (default: the project's default remote) of the project at
    `root`, merged from .dvc/config and .dvc/config.local; None when it is not on S3."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        config = repo.config
    remote = remote or config["core"].get("remote")
    if not remote:
        raise UserError("the project has no default DVC remote: dvc remote add -d <name> s3://...")
    if remote not in config["remote"]:
        raise UserError(f"no DVC remote {remote!r} in .dvc/config (dvc remote list shows them)")
    settings = config["remote"][remote]
    if not str(settings["url"]).startswith("s3://"):
        return None
    keys = {"access_key_id": "aws_access_key_id", "secret_access_key": "aws_secret_access_key"}
    keys.update(session_token="aws_session_token", profile="profile_name", region="region_name")
    credentials = {ours: settings[theirs] for theirs, ours in keys.items() if settings.get(theirs)}
    return Bucket(
        str(settings["url"]),
        f"DVC remote {remote!r}",
        settings.get("endpointurl"),
        credentials,
        set_endpoint=f"its endpointurl (dvc remote modify {remote} endpointurl URL)",
        set_credentials=(
            f"`dvc remote modify --local {remote} access_key_id` and `secret_access_key` "
            "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        ),
        set_uri=f"its url (dvc remote modify {remote} url s3://BUCKET/PREFIX)",
    )
