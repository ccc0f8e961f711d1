"""conf/ is the source of truth: params.yaml and dvc.yaml must agree with it."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from dlilabs.ground.config import compose

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())
LABS = sorted(path.stem for path in (REPO / "conf" / "experiment").glob("*.yaml"))


def relative(path: str) -> str:
    return Path(path).relative_to(REPO).as_posix()


@pytest.mark.parametrize("lab", LABS)
def test_each_experiment_names_itself(lab):
    assert compose([f"experiment={lab}"]).lab == lab


@pytest.mark.parametrize("lab", sorted(PARAMS["labs"]))
def test_params_dataset_matches_the_experiment(lab):
    """dvc.yaml passes params.yaml's dataset as an override; it must be the lab's own."""
    assert PARAMS["labs"][lab]["dataset"] == compose([f"experiment={lab}"]).dataset.name


def test_every_lab_has_a_stage():
    image_labs = {
        lab for lab in LABS if compose([f"experiment={lab}"]).dataset.task == "classification"
    }
    assert set(PARAMS["labs"]) == image_labs
    assert "line_fit" in DVC["stages"]


@pytest.mark.parametrize("lab", sorted(PARAMS["labs"]))
def test_dvc_paths_follow_conf_paths(monkeypatch, lab):
    monkeypatch.setenv("DLILABS_ROOT", str(REPO))
    cfg = compose([f"experiment={lab}"])
    train, evaluate = DVC["stages"]["train"]["do"], DVC["stages"]["evaluate"]["do"]
    rendered = {"${key}": lab, "${item.dataset}": cfg.dataset.name}

    def render(text):
        for placeholder, value in rendered.items():
            text = text.replace(placeholder, value)
        return text

    outs = [render(next(iter(o)) if isinstance(o, dict) else o) for o in train["outs"]]
    assert f"{relative(cfg.paths.model_dir)}/model.keras" in outs
    assert f"{relative(cfg.paths.prepared_dir)}/train.npz" in [render(d) for d in train["deps"]]
    metrics = [render(next(iter(m))) for m in evaluate["metrics"]]
    assert metrics == [f"{relative(cfg.paths.eval_dir)}/metrics.json"]


@pytest.mark.parametrize("dataset", PARAMS["datasets"])
def test_dvc_data_paths_follow_conf_paths(monkeypatch, dataset):
    monkeypatch.setenv("DLILABS_ROOT", str(REPO))
    cfg = compose([f"dataset={dataset}"])
    download = DVC["stages"]["download"]["do"]
    preprocess = DVC["stages"]["preprocess"]["do"]
    assert download["outs"] == ["data/raw/${item}"]
    assert relative(cfg.paths.raw_dir) == f"data/raw/{dataset}"
    assert relative(cfg.paths.prepared_dir) == f"data/prepared/{dataset}"
    assert "data/prepared/${item}/train.npz" in preprocess["outs"]


def test_every_lab_has_learning_curves():
    charted = set()
    for entry in DVC["plots"]:
        (chart,) = entry.values()
        charted |= {Path(history).parent.name for history in chart["y"]}
    assert charted == set(PARAMS["labs"])


def test_profiles_in_params_exist():
    assert (REPO / "conf" / "profile" / f"{PARAMS['profile']}.yaml").is_file()


def test_dvc_stage_list_shows_every_stage():
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "stage", "list"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    names = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    expected = {
        f"{stage}@{dataset}" for stage in ("download", "preprocess") for dataset in ("mnist", "asl")
    }
    expected |= {f"{stage}@{lab}" for stage in ("train", "evaluate") for lab in PARAMS["labs"]}
    assert expected | {"line_fit"} == names


@pytest.mark.parametrize("stage", ["download", "preprocess", "train", "evaluate"])
def test_stage_help_lists_its_config(stage):
    result = subprocess.run(
        [sys.executable, "-m", f"dlilabs.{stage}", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for group in ("dataset:", "model:", "trainer:", "experiment:", "profile:"):
        assert group in result.stdout
    assert "asl_cnn_aug" in result.stdout  # the lab choices are listed


def test_config_mistake_is_a_short_error_not_a_traceback(project):
    from conftest import stage_env

    result = subprocess.run(
        [sys.executable, "-m", "dlilabs.train", "experiment=asl_cnnn"],
        env=stage_env(project),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "asl_cnnn" in result.stderr and "Available options" in result.stderr
    assert "Traceback" not in result.stderr
