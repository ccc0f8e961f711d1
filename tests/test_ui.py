"""The MLflow UI as a person sees it: a real `mlflow ui` over the store `make demo` fills (the
real demo, shared with tests/test_demo.py), driven by Debian's Chromium through Selenium,
each test page opened in one fresh profile.

Screenshots are saved to build/test-artifacts/ui/ (or $DLILABS_TEST_ARTIFACTS/ui/):
experiment_runs.png (the page the demo's link opens: runs and the story's charts; the
README's docs/ui-story.png is cut from it), run_metrics.png (a run's metrics, gap/accuracy
among them) and run_<picture>.png (each logged PNG opened in the run's artifact view)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from conftest import REPO
from dlilabs.tracking.postgres import free_port

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL_HINT = "apt-get install -y chromium chromium-driver (.ci/run does it)"
SHOTS = Path(os.environ.get("DLILABS_TEST_ARTIFACTS", REPO / "build" / "test-artifacts")) / "ui"
# The demo's runs (tests/test_demo.py checks the names), and what only MLflow's GenAI pages show.
RUN_NAMES = ["mlp · mnist_5k", "cnn · mnist_5k", "cnn+aug · mnist_5k"]
GENAI_ONLY = ("Token Usage", "Detect Issues", "Tool calls", "Training runs")
# Logged under the run's plots/: the evaluate stage's pictures and the dataset's samples.
PICTURES = {
    name: f"eval/asl_cnn_aug/{name}"
    for name in ("learning_curves.png", "confusion.png", "train_inputs.png")
}
PICTURES["samples.png"] = "data/prepared/mnist_demo/samples.png"


@pytest.fixture(scope="module")
def store(demo) -> Path:
    """The folder of the demo's MLflow store (mlflow.db, mlartifacts/)."""
    return demo["store"]


@pytest.fixture(scope="module")
def ui(store, tmp_path_factory) -> tuple[str, str]:
    """`make ui`'s `python -m dlilabs.ui` over the demo's store on a free 127.0.0.1 port:
    yields (its base URL, the link it printed once the server answered)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("ui-log") / "dlilabs-ui.log"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update(DLILABS_STORE_DIR=str(store), MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dlilabs.ui", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while "MLflow UI: " not in log_path.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.5)
        (link,) = re.findall(r"MLflow UI: (\S+)", log_path.read_text()) or [None]
        assert link, f"no link printed within 240 s: {log_path.read_text()[-3000:]}"
        yield url, link
    finally:
        process.terminate()  # dlilabs.ui stops its mlflow server (its own process group)
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium through Selenium and /usr/bin/chromedriver, fresh profile."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"no {CHROMIUM} or {CHROMEDRIVER}: {INSTALL_HINT}")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e '.[dev]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-crash-reporter",
        "--window-size=1600,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):  # a reviewer must not mistake last run's pictures
        old.unlink()
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str, seconds: float = 60):
    """Wait until `condition(driver)` is truthy; on timeout, save a screenshot and fail. An
    element the page re-rendered between finding and reading it counts as not there yet."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        wait = WebDriverWait(
            driver, seconds, poll_frequency=0.5, ignored_exceptions=[StaleElementReferenceException]
        )
        return wait.until(condition)
    except TimeoutException:
        driver.save_screenshot(str(SHOTS / "failure.png"))
        pytest.fail(f"{what} not visible within {seconds:.0f} s (see {SHOTS / 'failure.png'})")


def visible_text(text: str):
    """A wait condition: an element whose own text is exactly `text` is displayed."""
    from selenium.webdriver.common.by import By

    def condition(driver):
        found = driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']")
        return next((element for element in found if element.is_displayed()), False)

    return condition


def close_assistant(driver) -> None:
    """Close MLflow's assistant side panel, if open, so screenshots show the page itself."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()


def lab_run(store: Path, lab: str):
    """(experiment id, run) of the demo's run of `lab`."""
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    experiment = client.get_experiment_by_name("dlilabs-demo")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.lab = '{lab}'")
    return experiment.experiment_id, run


def printed_link(demo, base: str) -> str:
    """The link the demo's closing lines print for `make ui`, sent to the server at `base`."""
    (link,) = [word for word in demo["output"].split() if "/#/experiments/" in word]
    assert link.startswith("http://127.0.0.1:5000/#/"), link
    return link.replace("http://127.0.0.1:5000", base, 1)


def chart_traces(driver, metric: str):
    """The runs' traces ({name, x, y}) the UI plotted in the chart titled `metric`, read from
    Plotly's own data on the page; False while that chart is not drawn."""
    return driver.execute_script(
        "const title = Array.from(document.querySelectorAll("
        "  '[data-testid=experiment-view-compare-runs-card] h4'))"
        "  .find(h => h.textContent.trim() === arguments[0]);"
        "const card = title && title.closest('[data-testid=experiment-view-compare-runs-card]');"
        "const plot = card && card.querySelector('.js-plotly-plot');"
        "if (!plot || !plot.data || !plot.data.length) return false;"
        "return plot.data.filter(t => t.mode && t.mode.includes('lines'))"
        "  .map(t => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)}));",
        metric,
    )


def test_the_printed_link_opens_the_runs_on_the_story(ui, store, demo, browser):
    """A fresh browser following the link `make ui` prints (the demo prints the same): the
    three runs by name, no GenAI pages, the description, and the story's first chart,
    val/accuracy per epoch, as logged."""
    base, link = ui
    assert link == printed_link(demo, base)
    browser.get(link)
    for name in RUN_NAMES:
        wait_for(browser, visible_text(name), f"run {name} in the runs list")
    traces = wait_for(browser, lambda d: chart_traces(d, "val/accuracy"), "val/accuracy chart")
    page = browser.find_element("tag name", "body").text
    assert not [text for text in GENAI_ONLY if text in page], page[:2000]
    assert "/overview" not in browser.current_url, browser.current_url
    assert "The story, per epoch" in page  # the experiment description's first line
    titles = browser.execute_script(
        "return Array.from(document.querySelectorAll("
        "'[data-testid=experiment-view-compare-runs-card] h4')).map(h => h.textContent.trim())"
    )
    assert titles[:2] == ["val/accuracy", "gap/accuracy"], titles
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    plotted = {trace["name"]: trace for trace in traces}
    for run in demo["runs"]:
        if run.info.run_name not in RUN_NAMES:
            continue
        history = client.get_metric_history(run.info.run_id, "val/accuracy")
        trace = plotted[run.info.run_name]
        assert trace["x"] == [point.step for point in history]
        assert len(trace["x"]) == int(run.data.params["trainer.epochs"]) > 1  # one per epoch
        assert trace["y"] == pytest.approx([point.value for point in history], abs=1e-9)
    close_assistant(browser)
    time.sleep(0.5)  # let the panel's closing animation end before the picture
    browser.save_screenshot(str(SHOTS / "experiment_runs.png"))


def test_run_page_shows_the_gap_metric(ui, store, browser):
    experiment_id, run = lab_run(store, "asl_cnn_aug")
    browser.get(f"{ui[0]}/#/experiments/{experiment_id}/runs/{run.info.run_id}")
    wait_for(browser, visible_text(run.info.run_name), "the run's title")
    close_assistant(browser)
    find_gap = visible_text("gap/accuracy")

    def gap_row(driver):  # found afresh each try: the page may re-render in between
        gap = find_gap(driver)
        if not gap:
            return False
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", gap)
        return driver.execute_script(
            "return Array.from(arguments[0].closest('[role=row]').querySelectorAll('[role=cell]'))"
            ".map(cell => cell.innerText.trim())",
            gap,
        )

    # The metrics table's row of gap/accuracy: its value, as the UI rounds it, is the
    # logged last value to the digits shown (at least three decimals).
    row = wait_for(browser, gap_row, "metric gap/accuracy")
    key, shown = row[:2]  # then the model the metric belongs to, if any
    value = run.data.metrics["gap/accuracy"]
    exponent = Decimal(shown).as_tuple().exponent  # -3 for 0.052, -4 for 1.2e-3
    assert key == "gap/accuracy" and exponent <= -3, row
    assert abs(float(shown) - value) <= 0.5 * 10.0**exponent + 1e-12, (value, shown)
    browser.save_screenshot(str(SHOTS / "run_metrics.png"))


@pytest.mark.parametrize("picture", PICTURES)
def test_run_artifacts_show_the_logged_pictures(ui, store, demo, browser, picture):
    experiment_id, run = lab_run(store, "asl_cnn_aug")
    browser.get("about:blank")  # a new page load: the app routes on the hash only when it starts
    browser.get(
        f"{ui[0]}/#/experiments/{experiment_id}/runs/{run.info.run_id}/artifactPath/plots/{picture}"
    )
    wait_for(browser, visible_text(f"plots/{picture}"), f"the artifact view of {picture}")
    with Image.open(demo["workspace"] / PICTURES[picture]) as image:
        width = image.size[0]
    # The preview is the logged PNG itself, decoded by the browser: same pixel width.
    shown = wait_for(
        browser,
        lambda d: d.execute_script(
            "return Array.from(document.images).some("
            "i => i.src.startsWith('blob:') && i.complete && i.naturalWidth === arguments[0]"
            " && i.getBoundingClientRect().width > 200)",
            width,
        ),
        f"the picture {picture}",
    )
    assert shown
    close_assistant(browser)
    time.sleep(0.5)
    browser.save_screenshot(str(SHOTS / f"run_{picture}"))
