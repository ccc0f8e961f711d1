"""Stage output a person can read: no TensorFlow/absl/CUDA start-up noise, one device line,
real warnings and errors kept (dlilabs.ground.startup filters what TensorFlow prints natively,
from the commands' mains only: importing the package changes nothing)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import stage_env
from dlilabs.ground.startup import worth_showing

NOISE = (
    "absl::InitializeLog",
    "Could not find cuda drivers",
    "cuInit",
    "oneDNN custom operations",
    "cpu_feature_guard",
)
# What TensorFlow 2.21 printed on this machine (no GPU, no driver) before the filter.
CPU_START = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796064301.829879   11252 port.cc:153] oneDNN custom operations are on.
I0000 00:00:1796064301.830190   11252 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
E0000 00:00:1796064309.486412   11252 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)
"""  # noqa: E501
REAL = """\
E0000 00:00:1796064309.500000   11252 op_kernel.cc:1839] OP_REQUIRES failed: out of memory
/x/train.py:12: UserWarning: something a user should see
"""


def test_filter_drops_start_up_noise_and_keeps_real_errors():
    assert worth_showing(CPU_START + REAL, 2) == REAL


def test_cuinit_error_is_kept_when_a_driver_was_found():
    # With a driver present, a failing cuInit is a real problem on a GPU machine.
    cuinit = CPU_START.splitlines(keepends=True)[3]
    assert worth_showing(cuinit, 2) == cuinit


def test_tf_cpp_min_log_level_0_shows_everything():
    assert worth_showing(CPU_START, 0) == CPU_START.replace(CPU_START.splitlines()[3] + "\n", "")


def run_stage(project, stage: str) -> str:
    command = [
        sys.executable, "-m", f"dlilabs.{stage}", "experiment=mnist_mlp", "trainer.epochs=1",
        "model.hidden_units=[16]", "tracking.register_models=false",
    ]  # fmt: skip
    env = stage_env(project)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell: dlilabs sets its own default
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


@pytest.mark.slow
def test_train_and_evaluate_print_no_start_up_noise(project, tiny_mnist):
    train = run_stage(project, "train")
    evaluate = run_stage(project, "evaluate")
    for output in (train, evaluate):
        assert not [line for line in output.splitlines() if any(n in line for n in NOISE)]
    device_lines = [line for line in train.splitlines() if "Device:" in line]
    assert len(device_lines) == 1 and "Device: CPU" in device_lines[0]
    assert "[WARNING]" not in train  # a healthy CPU run warns about nothing
    # No progress bars drawn by MLflow's checks of the logged model, nor its schema chatter.
    assert "\x1b[" not in train and "1/1" not in train, train
    assert "Creating initial MLflow database tables" not in train
    assert "E0000" not in train + evaluate, train + evaluate
