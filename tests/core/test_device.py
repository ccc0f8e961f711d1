"""The GPU request. There is no GPU here: the fallback and the refusal are real, a present
GPU is simulated (the only mock in the suite)."""

import subprocess
import sys

import pytest
import tensorflow as tf

from conftest import stage_env
from dlilabs.core.device import select_device
from dlilabs.ground.errors import UserError


def test_no_gpu_falls_back_to_cpu_and_says_so(caplog):
    with caplog.at_level("INFO", logger="dlilabs"):
        used = select_device("gpu", gpus=[])
    assert used["device"] == "cpu"
    assert [r.getMessage() for r in caplog.records] == [
        "Device: CPU (no GPU visible; trainer.require_gpu=true would stop here)"
    ]


def test_required_gpu_missing_explains_how_to_run_on_cpu():
    with pytest.raises(UserError, match=r"trainer.require_gpu=false"):
        select_device("gpu", require_gpu=True, gpus=[])


def test_present_gpu_gets_memory_growth(monkeypatch):
    grown = []
    fake_gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    monkeypatch.setattr(
        tf.config.experimental,
        "set_memory_growth",
        lambda device, enable: grown.append((device.name, enable)),
    )
    monkeypatch.setattr(
        tf.config.experimental, "get_device_details", lambda device: {"device_name": "Tesla T4"}
    )
    used = select_device("gpu", gpus=[fake_gpu])
    assert used == {
        "device": "gpu",
        "device_name": "Tesla T4",
        "gpu_count": "1",
        "precision": "float32",
    }
    assert grown == [("/physical_device:GPU:0", True)]


def test_required_gpu_fails_before_loading_data(project):
    # No prepared data exists in `project`: the error must be about the GPU, not the data.
    result = subprocess.run(
        [sys.executable, "-m", "dlilabs.train", "experiment=mnist_mlp", "trainer.require_gpu=true"],
        env=stage_env(project),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "sees no GPU" in result.stderr and "trainer.require_gpu=false" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "preprocess" not in result.stderr
