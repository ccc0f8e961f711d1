"""Importing dlilabs changes nothing in the process; a command's filtered TensorFlow start-up
still lets a fatal message through, even when TensorFlow aborts the process in that window.

The aborting TensorFlow is a stand-in package named `tensorflow`, first on the path of a child
process: it writes absl's start-up noise and a fatal line to file descriptor 2 with os.write
(as native code does, past Python's sys.stderr) and calls abort(), as absl's LOG(FATAL) does.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

NOISE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1796064301.829879   11252 port.cc:153] oneDNN custom operations are on.\n"
    "I0000 00:00:1796064301.830190   11252 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.\n"
)
FATAL = "F0000 00:00:1796064302.000000   11252 cpu_feature_guard.cc:40] The TensorFlow library "
FATAL += "was compiled to use AVX instructions, but these aren't available on your machine.\n"


def fake_tensorflow(folder: Path, body: str) -> Path:
    """A package `tensorflow` in `folder` whose import runs `body` (os is imported)."""
    package = folder / "tensorflow"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import os\n" + textwrap.dedent(body))
    return folder


def run_command(folder: Path, code: str) -> subprocess.CompletedProcess:
    """`python -c code` with `folder` first on sys.path, as a command's main would run."""
    script = f"import sys; sys.path.insert(0, {str(folder)!r})\n" + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )


def test_import_dlilabs_changes_nothing():
    code = """\
        import os, sys
        finders = list(sys.meta_path)
        import dlilabs, dlilabs.entry, dlilabs.train, dlilabs.ground.startup
        print(os.environ.get("TF_CPP_MIN_LOG_LEVEL"), sys.meta_path == finders)
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},  # no TF_CPP_MIN_LOG_LEVEL inherited from the test run
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "True"]


def test_a_fatal_line_reaches_the_user_when_tensorflow_aborts_at_start_up(tmp_path):
    folder = fake_tensorflow(
        tmp_path,
        f"""\
        os.write(2, {NOISE.encode()!r})
        os.write(2, {FATAL.encode()!r})
        os.abort()
        """,
    )
    done = run_command(
        folder,
        """\
        from dlilabs.ground.startup import quiet_tensorflow_startup
        quiet_tensorflow_startup()
        import tensorflow
        """,
    )
    assert done.returncode == -signal.SIGABRT
    assert done.stderr == FATAL  # the fatal line whole; the start-up noise still dropped


def test_start_up_output_keeps_its_order_and_the_filter_ends(tmp_path):
    # A normal start-up: noise dropped, a real line kept and shown before what follows it.
    folder = fake_tensorflow(
        tmp_path,
        f"""\
        os.write(2, {NOISE.encode()!r} + b"a real warning\\n")

        class config:
            @staticmethod
            def list_physical_devices():
                os.write(2, b"E0000 00:00:1.2 1 cuda_platform.cc:52] failed call to cuInit\\n")
                return []
        """,
    )
    done = run_command(
        folder,
        """\
        import os, sys
        from dlilabs.ground.startup import QuietTensorFlowImport, quiet_tensorflow_startup
        quiet_tensorflow_startup()
        import tensorflow
        os.write(2, b"after the import\\n")
        print(os.environ["TF_CPP_MIN_LOG_LEVEL"], type(tensorflow.__loader__).__name__,
              any(isinstance(f, QuietTensorFlowImport) for f in sys.meta_path))
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "a real warning\nafter the import\n"
    assert done.stdout.split() == ["2", "SourceFileLoader", "False"]  # no trace of the hook


@pytest.mark.parametrize("level", ["0", "3"])
def test_the_users_log_level_is_kept(tmp_path, level):
    folder = fake_tensorflow(tmp_path, f"os.write(2, {NOISE.encode()!r})\n")
    code = f"""\
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = {level!r}
        from dlilabs.ground.startup import native_stderr_filtered
        with native_stderr_filtered():
            import tensorflow
    """
    done = run_command(folder, code)
    assert done.returncode == 0, done.stderr
    # Level 0 shows absl's info lines too; 3 hides them (and the pre-init notice) all.
    assert done.stderr == (NOISE if level == "0" else "")


def test_keras_loads_without_scikit_learn_which_still_imports_after():
    code = """\
        import sys
        from dlilabs.ground.startup import KerasWithoutScikitLearn, quiet_tensorflow_startup
        quiet_tensorflow_startup()
        import keras
        print("sklearn" in sys.modules, type(keras.__loader__).__name__,
              any(isinstance(f, KerasWithoutScikitLearn) for f in sys.meta_path))
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        print(model.predict(keras.ops.ones((1, 3)), verbose=0).shape)
        from sklearn.metrics import confusion_matrix
        print(confusion_matrix([0, 1], [0, 0]).tolist())
        """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "False SourceFileLoader False",  # loaded without it, no trace of the hook left
        "(1, 2)",
        "[[1, 0], [1, 0]]",
    ]


COMMAND = """
import atexit, sys, threading, time
from pathlib import Path
from dlilabs.ground.startup import run_command

folder, outcome = Path(sys.argv[1]), sys.argv[2]


class Teardown:
    def __del__(self):
        sys.stderr.write("torn down\\n")


kept_until_teardown = Teardown()


def late_thread():
    time.sleep(0.3)
    (folder / "thread.txt").write_text("joined")


def main():
    atexit.register(lambda: (folder / "atexit.txt").write_text("ran"))
    threading.Thread(target=late_thread).start()
    sys.stdout.write("said without a newline")  # block-buffered: stdout is a pipe
    if outcome == "error":
        raise ValueError("a bug")
    if outcome == "message":
        sys.exit("error: the user's mistake")
    return {"zero": None, "three": 3, "exit2": 2}[outcome]
"""


@pytest.mark.parametrize(
    ("outcome", "status"), [("zero", 0), ("three", 3), ("exit2", 2), ("message", 1)]
)
def test_a_command_ends_with_its_status_and_its_clean_up_done_without_the_teardown(
    tmp_path, outcome, status
):
    script = COMMAND + "\nrun_command(main if outcome != 'exit2' else lambda: sys.exit(main()))\n"
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), outcome],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == status, result.stderr
    assert result.stdout == "said without a newline"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "thread.txt").read_text() == "joined"  # other threads finish first
    assert ("error: the user's mistake" in result.stderr) == (outcome == "message")
    # What made every stage's user wait: the interpreter freeing its modules one by one.
    assert "torn down" not in result.stderr


def test_a_command_that_fails_with_a_bug_exits_as_python_does(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", COMMAND + "\nrun_command(main)\n", str(tmp_path), "error"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "ValueError: a bug" in result.stderr and "Traceback" in result.stderr
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert result.stdout == "said without a newline"
