"""The stages' Hydra entry point (dlilabs.entry): what every `python -m dlilabs.<stage>` shares."""

import json
import subprocess
import sys

from conftest import stage_env

# A stage whose task only notes the seed it got, its Hydra config loads counted.
STAGE = """
import json, sys
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from dlilabs.entry import stage_main

composed, seen = [], []
original = ConfigLoaderImpl.load_configuration

def counting(self, *args, **kwargs):
    composed.append(1)
    return original(self, *args, **kwargs)

ConfigLoaderImpl.load_configuration = counting

def task(cfg):
    seen.append(cfg.trainer.seed)
    return {"lab": cfg.lab}

sys.argv = ["train", "-m", *sys.argv[1:]]
try:
    stage_main(task)()
finally:
    print(json.dumps({"seen": seen, "composed": len(composed)}))
"""


def sweep(project, *overrides: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run(
        [sys.executable, "-c", STAGE, *overrides],
        env=stage_env(project),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, json.loads(result.stdout.strip().splitlines()[-1])


def test_a_sweep_composes_each_jobs_config_once_and_each_job_gets_its_own(project):
    result, found = sweep(project, "experiment=mnist_mlp", "trainer.seed=1,2,3")
    assert result.returncode == 0, result.stderr
    assert found["seen"] == [1, 2, 3]
    # Hydra's mode check and the sweep's own config, then one per job (Hydra alone: two per
    # job, ~0.25 s each: the sweeper's check of the batch, then the launcher's).
    assert found["composed"] == 2 + 3


def test_a_combination_that_cannot_compose_stops_the_sweep_before_any_job(project):
    result, found = sweep(project, "experiment=mnist_mlp", "model=mlp,nosuch")
    assert result.returncode == 2
    assert "error: " in result.stderr and "model/nosuch" in result.stderr
    assert found["seen"] == []  # the batch is still checked before it is launched
