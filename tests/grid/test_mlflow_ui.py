"""MLflow's own UI on a grid's store, in headless Chromium: the runs table lists the cells by readable names, and the
parent run shows the report (its description the tables, its artifacts `report/`).

One small grid (one ASR study, depth 2, no healing: train, path, eval, prune and summary cells) runs for real on a
local Ray and is summarised; `mlflow server` serves its store on 127.0.0.1 and Selenium drives Debian's chromium
through its chromedriver (`.ci/run` installs both). Screenshots go to a temporary folder and, when
`$SLAMGRID_SCREENSHOTS` names one, there too.

MLflow 3.17's UI lays an experiment out by its global "GenAI / Model training" switch (the URL's `workflowType`,
else what the browser last chose, GenAI at first), not by the experiment's `mlflow.experimentKind` tag that earlier
3.x releases read; the pages are therefore opened with `?workflowType=machine_learning`, as a link to them should be.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from grid.cells import expand
from grid.experiment import load_experiment
from grid.summarize import REPORT_DIR, summarize
from grid.tracking import EXPERIMENT_KIND, NOTE_TAG, UI_LAYOUT, GridStore, run_name
from slam.metrics import relative_change, within_threshold
from tests.grid.world import build_world, run_grid

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
STUDIES = [
    {"name": "asr", "task": "asr", "models": ["tiny"], "paths": [{"source": "speech"}], "depths": [2],
     "healing": ["none"]},
]  # fmt: skip
WAIT = 60
SERVER_START = 120  # `mlflow server` takes about 25 s to answer on a CPU runner

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason=f"needs Debian's chromium ({CHROMIUM}) and chromium-driver ({CHROMEDRIVER}); .ci/run installs them",
)


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory) -> tuple[Path, str]:
    """The small grid, run once on a local Ray and summarised (its report logged): (experiment file, tracking URI)."""
    world = build_world(tmp_path_factory.mktemp("world"))
    path, uri, report = run_grid(world, "ui", STUDIES, gpus=2)
    assert report.counts == {"FINISHED": 5}
    summarize(path, tracking_uri=uri)
    return path, uri


@pytest.fixture(scope="module")
def server(grid_run, tmp_path_factory) -> Iterator[str]:
    """`mlflow server` on the grid's store, on a free port of 127.0.0.1: its base URL."""
    _, uri = grid_run
    folder = tmp_path_factory.mktemp("server")
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--artifacts-destination", str(folder / "artifacts")]  # fmt: skip
    log = (folder / "server.log").open("wb")
    # A session of its own: the server starts uvicorn and a job runner, stopped with it as one process group.
    process = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(url, process, folder / "server.log")
        yield url
    finally:
        _stop(process)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> list[Path]:
    """The folders each screenshot is saved in: a temporary one, and `$SLAMGRID_SCREENSHOTS` when set."""
    folders = [tmp_path_factory.mktemp("screenshots")]
    if os.environ.get("SLAMGRID_SCREENSHOTS"):
        folders.append(Path(os.environ["SLAMGRID_SCREENSHOTS"]))
        folders[-1].mkdir(parents=True, exist_ok=True)
    return folders


def test_the_experiment_opens_on_its_runs_table_of_readable_cell_names(grid_run, server, browser, screenshots):
    path, uri = grid_run
    store = GridStore(uri, "ui")
    key, kind = EXPERIMENT_KIND
    assert MlflowClient(uri).get_experiment(store.experiment_id).tags[key] == kind
    cells = expand(load_experiment(path))
    names = {run_name(cell) for cell in cells}
    assert {name.rsplit(" [", 1)[0] for name in names} == {
        "train tiny asr",
        "path tiny asr speech",
        "eval tiny asr",
        "prune tiny asr speech-asr n=2 none",
        "summary asr",
    }

    browser.get(f"{server}/#/experiments/{store.experiment_id}?{UI_LAYOUT}")
    # The cells are the parent run's children: listed once its row is expanded.
    expander = (By.XPATH, "//div[@role='gridcell'][.//a[normalize-space()='grid']]//button")
    WebDriverWait(browser, WAIT).until(lambda driver: driver.find_elements(*expander))
    browser.find_element(*expander).click()
    listed = WebDriverWait(browser, WAIT).until(lambda driver: names <= _run_links(driver) and _run_links(driver))
    assert listed == names | {"grid"}
    assert "/runs" in browser.current_url and "/overview" not in browser.current_url
    assert "Tokens per Trace" not in browser.find_element(By.TAG_NAME, "body").text  # the GenAI overview's charts
    _close_assistant(browser)
    _save(browser, screenshots, "runs_table.png")


def test_the_parent_run_shows_the_report_tables_and_artifacts(grid_run, server, browser, screenshots):
    _, uri = grid_run
    store = GridStore(uri, "ui")
    parent = store.find_parent()
    note = MlflowClient(uri).get_run(parent).data.tags[NOTE_TAG]
    title = next(line[len("### ") :] for line in note.splitlines() if line.startswith("### Table 1"))
    page = f"{server}/#/experiments/{store.experiment_id}/runs/{parent}"

    browser.get(f"{page}?{UI_LAYOUT}")
    table = (By.CSS_SELECTOR, "[data-testid='note-editor-preview-content'] table")
    WebDriverWait(browser, WAIT).until(lambda driver: driver.find_elements(*table))
    description = browser.find_element(By.CSS_SELECTOR, "[data-testid='note-editor-preview-content']")
    assert title in description.get_attribute("textContent")
    rows = [
        [cell.get_attribute("textContent") for cell in row.find_elements(By.XPATH, "./th|./td")]
        for row in browser.find_element(*table).find_elements(By.TAG_NAME, "tr")
    ]
    assert rows[0] == ["model", "path", "healing", "drop %", "test"]
    assert [row[:3] for row in rows[1:]] == [["tiny", "speech-asr", "none"], ["+ pruning", "", ""]]
    browser.find_element(By.CSS_SELECTOR, "[data-testid='show-comment-toggle']").click()
    _close_assistant(browser)
    browser.execute_script("arguments[0].scrollIntoView()", description)
    _save(browser, screenshots, "parent_run.png")

    browser.get(f"{page}/artifacts?{UI_LAYOUT}")
    folder = (By.XPATH, f"//*[normalize-space(text())='{REPORT_DIR}']")
    WebDriverWait(browser, WAIT).until(lambda driver: driver.find_elements(*folder))
    browser.find_element(*folder).click()
    file = (By.XPATH, "//*[normalize-space(text())='table1.md']")
    WebDriverWait(browser, WAIT).until(lambda driver: driver.find_elements(*file))
    browser.find_element(*file).click()
    # The preview renders the file's Markdown: Table 1's title as a heading.
    WebDriverWait(browser, WAIT).until(lambda driver: title in driver.find_element(By.TAG_NAME, "body").text)
    listed = browser.find_element(By.TAG_NAME, "body").text
    assert all(name in listed for name in ("table1.txt", "table1.csv", "summary.json", "figure2.png"))
    _close_assistant(browser)
    _save(browser, screenshots, "parent_run_artifacts.png")


def test_the_pruned_cell_holds_its_change_against_the_baseline_as_metrics(grid_run):
    _, uri = grid_run
    client = MlflowClient(uri)
    store = GridStore(uri, "ui")
    cell_runs = client.search_runs([store.experiment_id], "tags.cell_id LIKE '%'")
    runs = {run.data.tags["cell_kind"]: run for run in cell_runs}
    prune, baseline = runs["prune"].data.metrics, runs["eval"].data.metrics
    delta = relative_change(prune["test.wer"], baseline["test.wer"])
    assert prune["test.delta"] == pytest.approx(delta, abs=1e-12)
    passes = within_threshold({"test": baseline["test.wer"]}, {"test": prune["test.wer"]}, "wer")
    assert prune["within_threshold"] == float(passes)
    # As sortable columns: MLflow orders runs by a metric on the server.
    delta_column = "metrics.`test.delta`"
    ordered = client.search_runs([store.experiment_id], f"{delta_column} > -1e9", order_by=[delta_column])
    assert [run.info.run_id for run in ordered] == [runs["prune"].info.run_id]


def _run_links(driver: WebDriver) -> set[str]:
    """The run names the runs table lists (whole, not as an ellipsis cuts them)."""
    links = driver.find_elements(By.CSS_SELECTOR, "[role='gridcell'] a[href*='/runs/']")
    return {link.get_attribute("textContent").strip() for link in links}


def _close_assistant(driver: WebDriver) -> None:
    """Close the MLflow Assistant panel if it is open: it takes a third of the screenshots otherwise."""
    for button in driver.find_elements(By.CSS_SELECTOR, "[data-component-id='mlflow.assistant.chat_panel.close']"):
        button.click()


def _save(driver: WebDriver, folders: list[Path], name: str) -> None:
    time.sleep(1)  # the last rendering settles (fonts, charts) before the picture
    first = folders[0] / name
    assert driver.save_screenshot(str(first))
    for folder in folders[1:]:
        shutil.copy(first, folder / name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_health(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mlflow server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow server did not answer {url}/health in {SERVER_START} s:\n{log.read_text()}")


def _stop(process: subprocess.Popen) -> None:
    """Stop the server's process group: SIGTERM, then SIGKILL for whatever is left of it after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    # Its uvicorn worker and job runner may outlive it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
