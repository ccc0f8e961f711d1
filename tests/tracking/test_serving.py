"""Serving what users have: a lab model trained by the real train stage (tiny, one epoch),
registered in a real SQLite store, then asked the same rows three ways: `dlilabs.predict`'s
code, the loaded pyfunc model, and a real `mlflow models serve --env-manager local` process
over HTTP. Raw pixels in three layouts, Kaggle CSV rows and PNG files give one answer."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image

from conftest import REPO, make_images, write_prepared
from dlilabs.ground.config import compose
from dlilabs.train import run as train_run

LETTERS = list("abcdefghiklmnopqrstuvwxy")  # ASL: no j, no z
LABS = {
    "asl_mlp": ["experiment=asl_mlp", "model.hidden_units=[16]", "trainer.epochs=1"],
    "asl_cnn": [
        "experiment=asl_cnn",
        "model.conv_blocks=[{filters:4,dropout:0.0},{filters:4,dropout:0.2}]",
        "model.dense_units=16",
        "trainer.epochs=1",
    ],
}
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(port: int, body: dict) -> tuple[int, dict]:
    """POST `body` as JSON to the server's /invocations: (status, decoded JSON answer)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def start_server(model_uri: str, store: str, log: Path) -> tuple[subprocess.Popen, int]:
    """`mlflow models serve` of `model_uri` on a free local port, once it answers /ping."""
    port = free_port()
    # MLflow starts `uvicorn` by name: the environment's bin folder goes first on PATH, as
    # activating it (or `make serve`) does.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": path}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    process = subprocess.Popen(
        command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return process, port
        except OSError:
            time.sleep(1)
    stop_server(process)
    raise AssertionError(f"the server did not answer in 180 s:\n{log.read_text()}")


@pytest.fixture(scope="module", params=list(LABS))
def served(request, tmp_path_factory):
    """A lab trained and registered (v1) in a fresh project, its store, and a server."""
    lab = request.param
    root = tmp_path_factory.mktemp(lab) / "project"
    shutil.copytree(REPO / "conf", root / "conf")
    write_prepared(root / "data" / "prepared" / "asl", 96, 24, 24)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DLILABS_ROOT", str(root))
        for variable in ("MLFLOW_TRACKING_URI", "DLILABS_STORE_DIR", "DVC_STAGE"):
            patch.delenv(variable, raising=False)
        train_run(compose(LABS[lab]))
        store = compose().tracking.uri
    model_uri = f"models:/{lab}/1"
    process, port = start_server(model_uri, store, root / "server.log")
    mlflow.set_tracking_uri(store)
    yield SimpleNamespace(lab=lab, root=root, store=store, model_uri=model_uri, port=port)
    stop_server(process)


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM to the server and its uvicorn workers; SIGKILL if they linger (a loaded CI)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.fixture
def inputs(tmp_path):
    """Six synthetic signs as uint8 pixels, a Kaggle-layout CSV of them and two PNG files
    (one at 28x28, one three times larger, which the decoder resizes back)."""
    images, labels = make_images(6, 24, seed=5)
    columns = [f"pixel{i}" for i in range(1, 785)]
    frame = pd.DataFrame(images.reshape(6, 784), columns=columns)
    frame.insert(0, "label", labels)
    csv = tmp_path / "signs.csv"
    frame.to_csv(csv, index=False)
    pngs = [tmp_path / "sign0.png", tmp_path / "sign1.png"]
    Image.fromarray(images[0]).save(pngs[0])
    Image.fromarray(images[1]).resize((84, 84), Image.NEAREST).convert("RGB").save(pngs[1])
    encoded = [base64.b64encode(path.read_bytes()).decode("ascii") for path in pngs]
    return SimpleNamespace(images=images, frame=frame, csv=csv, pngs=pngs, encoded=encoded)


def predict_command(served, paths: list[Path], model_uri: str | None = None) -> np.ndarray:
    """What `python -m dlilabs.predict <model_uri> <paths>` computes: probabilities (n, 24)."""
    from dlilabs.predict import classify, load_model, read_inputs

    model = load_model(model_uri or served.model_uri, served.root, served.store)[0]
    return classify(model, read_inputs(paths)[1])


def check(frame: pd.DataFrame, expected: np.ndarray) -> None:
    """A prediction frame (or the server's records) answers `expected` probabilities."""
    frame = pd.DataFrame(frame)
    assert list(frame.columns) == ["class", "probability", *LETTERS]
    np.testing.assert_allclose(frame[LETTERS].to_numpy(), expected, atol=1e-6, rtol=0)
    assert list(frame["class"]) == [LETTERS[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(frame["probability"], expected.max(axis=1), atol=1e-6, rtol=0)


def test_predict_pyfunc_and_server_give_one_answer(served, inputs):
    from_csv = predict_command(served, [inputs.csv])
    from_pngs = predict_command(served, inputs.pngs)
    np.testing.assert_allclose(from_pngs, from_csv[:2], atol=1e-6)  # the PNGs hold rows 1-2
    pyfunc = mlflow.pyfunc.load_model(served.model_uri)
    pixels = inputs.images
    layouts = {
        "(n, 28, 28)": pixels,
        "(n, 784)": pixels.reshape(-1, 784),
        "(n, 28, 28, 1)": pixels[..., np.newaxis],
    }
    for name, array in layouts.items():
        check(pyfunc.predict(array), from_csv)
        check(pyfunc.predict(array.astype(np.float64)), from_csv)  # floats 0-255 too
        status, answer = post(served.port, {"inputs": array.tolist()})
        assert status == 200, (name, answer)
        check(answer["predictions"], from_csv)
    check(pyfunc.predict(inputs.frame), from_csv)  # pandas.read_csv of the Kaggle file
    # Over HTTP CSV rows go as (n, 784) `inputs` (above): for a tensor signature MLflow's
    # server takes no other key, and says so.
    csv_rows = json.loads(inputs.frame.to_json(orient="split", index=False))
    status, answer = post(served.port, {"dataframe_split": csv_rows})
    assert status == 400 and "with 'inputs' key" in answer["message"], answer
    check(pyfunc.predict({"images": np.array(inputs.encoded)}), from_pngs)
    status, answer = post(served.port, {"inputs": {"images": inputs.encoded}})
    assert status == 200, answer
    check(answer["predictions"], from_pngs)


BAD = {
    "27x27 images": ({"inputs": np.zeros((2, 27, 27)).tolist()}, "got shape (2, 27, 27)"),
    "scaled to 0-1": (None, "look scaled to 0-1 already"),
    "values over 255": ({"inputs": np.full((1, 784), 300).tolist()}, "range from 300 to 300"),
    "not base64": ({"inputs": {"images": ["not base64!"]}}, "images item 1: not base64"),
    "not an image": (
        {"inputs": {"images": [base64.b64encode(b"hello").decode()]}},
        "images item 1: not a readable image",
    ),
    "other input name": ({"inputs": {"pixel": [[0] * 784]}}, "inputs named ['pixel']"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_other_input_is_a_400_that_says_what_the_model_takes(served, inputs, case):
    body, words = BAD[case]
    if body is None:
        body = {"inputs": (inputs.images / 255.0).tolist()}
    status, answer = post(served.port, body)
    assert status == 400, answer
    message = answer["message"]
    assert words in message, message
    if case not in ("other input name",):
        assert "expected raw pixel values 0-255" in message or "Expected raw pixel" in message
    print(f"{case}: {json.dumps(answer)[-400:]}")  # README "Serving" quotes these
    with pytest.raises(MlflowException, match="expected|Expected"):
        mlflow.pyfunc.load_model(served.model_uri).predict(body["inputs"])


def test_signature_and_card_say_raw_pixels_and_letters(served):
    from dlilabs.tracking.cards import card_summary

    info = mlflow.models.get_model_info(served.model_uri)
    spec = info.signature.inputs.inputs[0]
    assert (spec.name, spec.type, spec.shape) == ("pixels", np.dtype("float32"), (-1, 28, 28))
    assert info.signature.outputs.input_names() == ["class", "probability", *LETTERS]
    version = mlflow.MlflowClient().get_model_version(served.lab, "1")
    assert "- Takes: raw pixels 0-255" in version.description
    assert "- Answers class names a, b, c, d, e, f, g, h, i, k," in version.description
    assert card_summary(served.model_uri, served.store).endswith("input: raw pixels 0-255")


def test_an_older_scaled_input_version_keeps_working(served, inputs):
    # Versions registered before raw-pixel serving: Keras flavor, no scaling layer, trained
    # on x / 255. dlilabs.predict divides for them; their pyfunc takes scaled input as before.
    import keras

    from dlilabs.tracking.cards import card_markdown, card_summary, write_card
    from dlilabs.tracking.modellog import log_keras_model

    current = predict_command(served, [inputs.csv])
    model = mlflow.pyfunc.load_model(served.model_uri).unwrap_python_model().model
    older = keras.Sequential([keras.Input((28, 28)), *model.layers[1:]])  # same weights
    scaled = inputs.images.astype(np.float32) / 255.0
    with mlflow.start_run() as run:
        mlflow.log_param("dataset.class_names", str(LETTERS))
        log_keras_model(older, scaled[:2], f"{served.lab}_older")
    older_uri = f"models:/{served.lab}_older/1"
    assert "keras" in mlflow.models.get_model_info(older_uri).flavors
    np.testing.assert_allclose(predict_command(served, [inputs.csv], older_uri), current, atol=1e-6)
    as_before = mlflow.pyfunc.load_model(older_uri).predict(scaled)
    np.testing.assert_allclose(np.asarray(as_before), current, atol=1e-6)
    # Its card, as written before cards had an input section: the next version's card
    # writing adds the section to it (the registry description).
    client, name = mlflow.MlflowClient(), f"{served.lab}_older"
    card = card_markdown(name, "1", mlflow.get_run(run.info.run_id), None, None)
    section = card[card.index("## Input and classes") : card.index("## Data")]
    assert "- Takes: pixels scaled to [0, 1]" in section
    old_card = card.replace(section, "").replace(" · input: scaled 0-1", "")
    client.update_model_version(name, "1", description=old_card)
    with mlflow.start_run() as newer:
        mlflow.log_param("dataset.class_names", str(LETTERS))
        log_keras_model(model, inputs.images[:2].astype(np.float32), name, LETTERS)
    write_card(client, compose(LABS[served.lab]), newer.info.run_id, name, "2")
    assert client.get_model_version(name, "1").description == card
    assert card_summary(f"models:/{name}/1", served.store).endswith("input: scaled 0-1")
