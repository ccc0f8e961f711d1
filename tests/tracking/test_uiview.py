"""What a stage's connect leaves on the experiment for the MLflow UI (a real SQLite store):
the experiment kind, the description, the saved view "The story"; a person's edits are kept.
(tests/test_ui.py checks in Chromium that the UI reads them as meant.)"""

from __future__ import annotations

import json

from mlflow import MlflowClient

from dlilabs.ground.config import compose
from dlilabs.tracking.store import connect
from dlilabs.tracking.uiview import (
    KIND_TAG,
    NOTE_TAG,
    VIEW_TAG,
    description,
    runs_url,
    view_state,
    wanted_tags,
)


def tags_after_connect(overrides=()) -> tuple[str, dict[str, str]]:
    tracking = compose(list(overrides)).tracking
    experiment_id = connect(tracking)
    return experiment_id, MlflowClient(tracking.uri).get_experiment(experiment_id).tags


def test_a_new_experiment_opens_as_model_training_on_the_story(project):
    _, tags = tags_after_connect()
    assert tags[KIND_TAG] == "custom_model_development"
    note = tags[NOTE_TAG]
    assert "`val/accuracy`" in note and "`gap/accuracy`" in note and "`asl_cnn_aug`" in note
    view = json.loads(tags[VIEW_TAG])
    assert view["name"] == "The story"
    state = json.loads(view["state"])
    first = [chart["metricKey"] for chart in state["compareRunCharts"][:2]]
    assert first == ["val/accuracy", "gap/accuracy"]
    assert {chart["type"] for chart in state["compareRunCharts"]} == {"LINE"}
    assert state["compareRunSections"][0]["name"] == "The story"


def test_the_demo_experiment_describes_the_demo_runs(project):
    _, tags = tags_after_connect(["profile=demo"])
    assert "`cnn+aug · mnist_5k`" in tags[NOTE_TAG] and "`asl_cnn_aug`" not in tags[NOTE_TAG]


def test_an_existing_experiment_gets_the_tags_when_a_stage_next_connects(project):
    tracking = compose().tracking
    client = MlflowClient(tracking.uri)
    old = client.create_experiment("dlilabs")  # as an older dlilabs left it: no tags
    assert KIND_TAG not in client.get_experiment(old).tags

    experiment_id, tags = tags_after_connect()

    assert experiment_id == old and tags[KIND_TAG] == "custom_model_development"
    assert VIEW_TAG in tags and NOTE_TAG in tags


def test_what_a_person_set_in_the_ui_is_kept(project):
    experiment_id, _ = tags_after_connect()
    client = MlflowClient(compose().tracking.uri)
    client.set_experiment_tag(experiment_id, NOTE_TAG, "My notes")
    client.set_experiment_tag(experiment_id, KIND_TAG, "genai_development")
    saved_over = json.dumps({"name": "The story", "createdAt": 1, "state": "deflate;eJwLyc8LAAAA"})
    client.set_experiment_tag(experiment_id, VIEW_TAG, saved_over)  # the UI's "Override view"

    _, tags = tags_after_connect()

    assert tags[NOTE_TAG] == "My notes" and tags[KIND_TAG] == "genai_development"
    assert tags[VIEW_TAG] == saved_over


def test_nothing_is_rewritten_once_in_place_and_an_older_text_of_ours_is_updated():
    done = {KIND_TAG: "custom_model_development", NOTE_TAG: description("labs", "- ✓ a story")}
    done[VIEW_TAG] = json.dumps({"by": "dlilabs", "state": json.dumps(view_state())})
    assert wanted_tags(done, "labs") == {}
    older = done | {NOTE_TAG: description("labs").replace("The story", "An older text")}
    assert wanted_tags(older, "labs") == {NOTE_TAG: description("labs")}
    stale = done | {VIEW_TAG: json.dumps({"by": "dlilabs", "state": "{}"})}
    assert list(wanted_tags(stale, "labs")) == [VIEW_TAG]


def test_the_link_opens_model_training_charts_in_the_story_view():
    assert runs_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
        "&compareRunsMode=CHART&viewStateShareKey=dlilabs-story"
    )
    assert runs_url("http://h:1", None) == "http://h:1/#/experiments?workflowType=machine_learning"
