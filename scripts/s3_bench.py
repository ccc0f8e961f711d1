"""Push and pull times of a team's two S3 stores, beside a plain boto3 copy of the same bytes.

    python scripts/s3_bench.py            # 3 rounds, medians (needs `make dev`: moto, dvc-s3)
    python scripts/s3_bench.py --rounds 1

Writes ASL-shaped prepared splits (27,455 train and 7,172 val rows of 28x28 uint8, random, as
`np.savez` like the preprocess stage) and the asl_cnn model (built, untrained, saved .keras),
starts moto's S3 server on 127.0.0.1 and an `mlflow server` (SQLite backend) whose artifacts
it proxies into a bucket, then times, per round and on fresh keys:
  boto3   upload_file / download_file of each file (what `aws s3 cp` does);
  dvc     `dvc push` from a repo that `dvc add`ed them / `dvc pull` into a clone, empty cache;
  mlflow  log_artifacts through the server / download_artifacts through it (the model only:
          that is what MLflow stores; the splits go to DVC).
Prints the medians side by side, with each tool's overhead over boto3 for the same bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' moto helpers

from dlilabs.tracking.postgres import end  # noqa: E402
from s3env import CREDENTIALS, client_env, run, start_moto, wait_for_port  # noqa: E402

DVC = [sys.executable, "-m", "dvc"]
GIT = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.org"]


def write_inputs(folder: Path) -> dict[str, list[Path]]:
    """The splits and the model, as the pipeline writes them; returns {"splits", "model"}."""
    from dlilabs.core.models import build_model
    from dlilabs.ground.config import compose

    rng = np.random.default_rng(0)
    splits = folder / "data"
    splits.mkdir(parents=True)
    for name, rows in (("train", 27_455), ("val", 7_172)):
        x = rng.integers(0, 256, size=(rows, 28, 28), dtype=np.uint8)
        np.savez(splits / f"{name}.npz", x=x, y=rng.integers(0, 24, size=rows))
    cfg = compose(["experiment=asl_cnn"])
    model = build_model(cfg.model, num_classes=cfg.dataset.num_classes)
    (folder / "model").mkdir()
    model.save(folder / "model" / "model.keras")
    return {"splits": sorted(splits.iterdir()), "model": [folder / "model" / "model.keras"]}


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def boto3_round(moto, files: list[Path], key: str, into: Path) -> tuple[float, float]:
    client = moto.client()
    up = timed(lambda: [client.upload_file(str(f), "plain", f"{key}/{f.name}") for f in files])
    into.mkdir(parents=True)
    down = timed(
        lambda: [
            client.download_file("plain", f"{key}/{f.name}", str(into / f.name)) for f in files
        ]
    )
    return up, down


def dvc_round(moto, files: list[Path], key: str, work: Path) -> tuple[float, float]:
    """`dvc add` the files in a fresh repo whose remote is s3://dvc/<key>, time `dvc push`;
    clone it, time `dvc pull` into the clone's empty cache."""
    repo, clone = work / "repo", work / "clone"
    repo.mkdir(parents=True)
    env = client_env(repo)
    for file in files:
        shutil.copy2(file, repo / file.name)
    run(repo, env, "git", "init", "-q")
    run(repo, env, *DVC, "init", "-q")
    run(repo, env, *DVC, "remote", "add", "-d", "team", f"s3://dvc/{key}")
    run(repo, env, *DVC, "remote", "modify", "team", "endpointurl", moto.endpoint)
    for option, variable in (
        ("access_key_id", "AWS_ACCESS_KEY_ID"),
        ("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
    ):
        run(repo, env, *DVC, "remote", "modify", "--local", "team", option, CREDENTIALS[variable])
    run(repo, env, *DVC, "add", "-q", *[file.name for file in files])
    run(repo, env, "git", "add", "-A")
    run(repo, env, *GIT, "commit", "-qm", "data")
    up = timed(lambda: run(repo, env, *DVC, "push", "-q"))
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    shutil.copy2(repo / ".dvc" / "config.local", clone / ".dvc" / "config.local")
    down = timed(lambda: run(clone, client_env(clone), *DVC, "pull", "-q"))
    for file in files:
        assert (clone / file.name).read_bytes() == file.read_bytes(), file.name
    return up, down


def mlflow_round(uri: str, files: list[Path], work: Path) -> tuple[float, float]:
    """log_artifacts of the files' folder into a new run through the server, then
    download_artifacts of them through it."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench") or client.create_experiment("bench")
    experiment_id = getattr(experiment, "experiment_id", experiment)
    run_id = client.create_run(experiment_id).info.run_id
    folder = files[0].parent
    up = timed(lambda: client.log_artifacts(run_id, str(folder), "model"))
    client.set_terminated(run_id)
    work.mkdir(parents=True)
    down = timed(lambda: client.download_artifacts(run_id, "model", str(work)))
    return up, down


def start_mlflow_server(moto, folder: Path):
    """`mlflow server` over SQLite, proxying artifacts to s3://mlflow/bench; only it gets the
    bucket's credentials."""
    from dlilabs.tracking.teamserver import free_port

    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
        "--artifacts-destination", "s3://mlflow/bench", "--serve-artifacts",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, **CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": moto.endpoint}
    with open(folder / "mlflow.log", "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)
    wait_for_port(port, process, timeout=120)
    time.sleep(2)  # the port opens before the app answers
    return process, f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dlilabs-s3-bench-"))
    moto = start_moto("dvc", "mlflow", "plain", log=work / "moto.log")
    server = None
    try:
        inputs = write_inputs(work / "inputs")
        server, uri = start_mlflow_server(moto, work)
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for round_ in range(args.rounds):
            for what, files in inputs.items():
                key = f"r{round_}-{what}"
                times.setdefault(("boto3", what), []).append(
                    boto3_round(moto, files, key, work / "boto3" / key)
                )
                times.setdefault(("dvc", what), []).append(
                    dvc_round(moto, files, key, work / "dvc" / key)
                )
            times.setdefault(("mlflow", "model"), []).append(
                mlflow_round(uri, inputs["model"], work / "mlflow" / f"r{round_}")
            )
        report(inputs, times, args.rounds)
    finally:
        if server is not None:
            end(server, signal.SIGTERM, group=True)
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(inputs: dict, times: dict, rounds: int) -> None:
    print(f"S3 through moto on 127.0.0.1, medians of {rounds} round(s), seconds")
    header = f"{'what':<8}{'MB':>7}  {'tool':<7}{'push':>7}{'pull':>7}"
    print(f"{header}  {'push/boto3':>10}{'pull/boto3':>11}")
    for what, files in inputs.items():
        size = sum(f.stat().st_size for f in files) / 1e6
        up0, down0 = (statistics.median(t[i] for t in times[("boto3", what)]) for i in (0, 1))
        for tool in ("boto3", "dvc", "mlflow"):
            if (tool, what) not in times:
                continue
            up, down = (statistics.median(t[i] for t in times[(tool, what)]) for i in (0, 1))
            print(
                f"{what:<8}{size:>7.1f}  {tool:<7}{up:>7.2f}{down:>7.2f}  "
                f"{up / up0:>9.1f}x{down / down0:>10.1f}x"
            )


if __name__ == "__main__":
    sys.exit(main())
