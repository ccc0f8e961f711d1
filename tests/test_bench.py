"""`make bench`'s train comparisons, from timed epochs to the printed rows (no training)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def bench():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO / "scripts"))  # as when run: it imports its siblings
        spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
        yield module
        sys.modules.pop("bench", None)


def test_disturbed_epochs_are_left_out_of_the_per_step_medians(bench):
    # [wall seconds, cores other processes used] per timed epoch; 100 training steps each.
    epochs = {
        "pipeline": [[2.0, 0.0], [2.2, 0.1], [9.0, 1.5], [2.4, 0.0]],
        "notebook": [[4.0, 0.0], [4.4, 0.0], [4.2, 0.05]],
    }
    comparison = bench.Comparison.from_epochs(epochs, steps=100)
    assert comparison.step_ms == pytest.approx({"pipeline": 22.0, "notebook": 42.0})
    assert comparison.worst_ms["pipeline"] == pytest.approx(24.0)  # the 90 ms epoch is out
    assert comparison.counted == 3 and comparison.disturbed == pytest.approx(0.1)
    row = comparison.row("train lab2", "pipeline", "notebook", 1.0)
    assert row.met
    text = str(row)
    assert text.startswith("train lab2: pipeline 22.0 ms/step vs notebook 42.0 ms/step")
    assert "-> ratio 0.52 (target <= 1;" in text and "DISTURBED" not in text


def test_a_busy_machine_is_flagged_and_a_slower_pipeline_misses(bench):
    # Fewer than 2 clean epochs for a side: every epoch counts and the row says so.
    epochs = {"pipeline": [[5.0, 1.2], [5.2, 0.9]], "notebook": [[4.0, 1.0], [4.1, 0.0]]}
    comparison = bench.Comparison.from_epochs(epochs, steps=200)
    assert comparison.disturbed == pytest.approx(1.2)
    text = str(comparison.row("train lab3", "pipeline", "notebook", 1.0))
    assert "DISTURBED: re-run on an idle machine" in text
    assert text.endswith("<-- TARGET MISSED")


def test_the_device_heading_names_a_gpu(bench):
    row = bench.device_row({"device": "gpu", "device_name": "Tesla T4", "precision": "float32"})
    assert str(row) == "train device: GPU Tesla T4 (float32)" and row.met
    assert str(bench.device_row({"device": "cpu"})).startswith("train device: CPU ")
