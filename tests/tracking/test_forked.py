"""`tracking.aside`: a stage's MLflow side in a forked process, beside its TensorFlow work.

Each case runs in a fresh interpreter (TensorFlow not loaded, as in a stage's command), and
the evaluate stage's use of it runs as the real command."""

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import stage_env, write_prepared
from dlilabs.ground.config import compose
from dlilabs.train import run as train_run

PRELUDE = """
import json, os, pathlib, sys, time
from dlilabs.ground.errors import UserError
from dlilabs.tracking import aside
out = pathlib.Path(sys.argv[1])
def note(name, value):
    (out / name).write_text(json.dumps(value))
def work_noting_failure(receive):  # notes what receive() raised, as "work_saw"
    try:
        receive()
    except Exception as error:
        note("work_saw", str(error))
"""


def run_case(tmp_path, body: str) -> subprocess.CompletedProcess:
    code = PRELUDE + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_work_runs_in_another_process_while_the_block_runs(tmp_path):
    # The block waits for the work to have started before it sends: run one after the
    # other in one process, it would wait in vain.
    result = run_case(
        tmp_path,
        """
        def work(receive):
            note("started", os.getpid())
            note("received", receive())
        with aside(work) as send:
            deadline = time.monotonic() + 30
            while not (out / "started").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            note("block_saw_start", (out / "started").exists())
            send({"accuracy": 0.9, "classes": ["a", "b"]})
        note("stage", os.getpid())
        """,
    )
    assert result.returncode == 0, result.stderr
    read = {name: json.loads((tmp_path / name).read_text()) for name in
            ("started", "received", "block_saw_start", "stage")}  # fmt: skip
    assert read["block_saw_start"] is True
    assert read["received"] == {"accuracy": 0.9, "classes": ["a", "b"]}
    assert read["started"] != read["stage"]


def test_a_failing_block_reaches_the_work_then_is_raised_as_it_was(tmp_path):
    result = run_case(
        tmp_path,
        """
        def work(receive):
            try:
                receive()
            except Exception as error:
                note("work_saw", [getattr(error, "kind", ""), str(error)])
                raise
        with aside(work) as send:
            raise ValueError("the model does not fit the data\\nsecond line")
        """,
    )
    assert result.returncode == 1
    assert "ValueError: the model does not fit the data" in result.stderr
    kind, text = json.loads((tmp_path / "work_saw").read_text())
    assert (kind, text) == ("ValueError", "the model does not fit the data")


def test_the_works_errors_come_back_to_the_stage(tmp_path):
    result = run_case(
        tmp_path,
        """
        problems = [
            ("UserError", UserError("the store is read-only: chmod u+w it"), True),
            ("KeyError", KeyError("bug"), True),
            ("early", UserError("no tracking server at http://127.0.0.1:9"), False),
        ]
        for name, problem, after_receive in problems:
            def work(receive, problem=problem, after_receive=after_receive):
                if after_receive:
                    receive()
                raise problem  # before receive: gone before the stage sends
            try:
                with aside(work) as send:
                    time.sleep(0 if after_receive else 1)
                    send(list(range(100_000)))  # more than a pipe holds
            except Exception as error:
                note(name, [type(error).__name__, str(error)])
        """,
    )
    assert result.returncode == 0, result.stderr
    user = json.loads((tmp_path / "UserError").read_text())
    assert user == ["UserError", "the store is read-only: chmod u+w it"]
    kind, text = json.loads((tmp_path / "KeyError").read_text())
    assert kind == "RuntimeError" and "MLflow side failed" in text
    assert "KeyError: 'bug'" in text  # the other side's traceback, for whoever debugs it
    early = json.loads((tmp_path / "early").read_text())
    assert early == ["UserError", "no tracking server at http://127.0.0.1:9"]


def test_a_stage_process_that_dies_is_seen_by_the_work(tmp_path):
    result = run_case(
        tmp_path,
        """
        with aside(work_noting_failure) as send:
            os._exit(3)  # killed: no send, no clean-up
        """,
    )
    assert result.returncode == 3
    deadline = time.monotonic() + 20  # the work outlives the stage by a moment
    while not (tmp_path / "work_saw").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "stopped before it was done" in json.loads((tmp_path / "work_saw").read_text())


def test_a_block_that_sends_nothing_is_a_programming_error_the_work_sees(tmp_path):
    result = run_case(
        tmp_path,
        """
        try:
            with aside(work_noting_failure) as send:
                pass
        except RuntimeError as error:
            note("stage_saw", str(error))
        """,
    )
    assert result.returncode == 0, result.stderr
    assert "without send()" in json.loads((tmp_path / "stage_saw").read_text())
    # The stage waited for the other side, which had seen it stop.
    assert "stopped before it was done" in json.loads((tmp_path / "work_saw").read_text())


TINY = ["experiment=mnist_mlp", "model.hidden_units=[32]", "trainer.epochs=1"]


@pytest.mark.slow
def test_the_evaluate_command_records_a_failure_found_while_scoring(project, tiny_mnist):
    """The real command (its MLflow side forked): a dataset the model does not fit is one
    error line and exit 2, and the train run says evaluate failed, and why."""
    summary = train_run(compose(TINY))
    write_prepared(project / "data" / "prepared" / "asl", 48, 24, 24)
    command = [sys.executable, "-m", "dlilabs.evaluate", *TINY, "dataset=asl"]
    result = subprocess.run(
        command, env=stage_env(project), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "with 24 classes" in result.stderr
    assert "Traceback" not in result.stderr
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["eval.status"] == "failed"
    assert run.data.tags["eval.error"].startswith("UserError: ")
    assert "with 24 classes" in run.data.tags["eval.error"]

    # The same command on the data the model fits: logged to the run, eval finished.
    result = subprocess.run(
        command[:-1], env=stage_env(project), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    run = client.get_run(summary["run_id"])
    written = json.loads((project / "eval" / "mnist_mlp" / "metrics.json").read_text())
    assert run.data.tags["eval.status"] == "finished" and "eval.error" not in run.data.tags
    assert run.data.metrics["eval/val_accuracy"] == pytest.approx(written["val"]["accuracy"])
    plots = {item.path for item in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/confusion.png" in plots
    assert np.isclose(
        run.data.metrics["eval/gap_accuracy"],
        written["train"]["accuracy"] - written["val"]["accuracy"],
    )
