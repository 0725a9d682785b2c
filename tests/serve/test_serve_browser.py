"""The search page in a real headless Chromium: type a query, see k results, click one to search by it."""

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from cliptune.config import ModelConfig
from cliptune.data.synthetic import make_shapes
from cliptune.index import Index
from cliptune.models import build_model
from cliptune.models.io import save_model
from cliptune.serve.app import Served, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, DRIVER):
        if not Path(path).is_file():
            return f"{path} not found: install Debian's chromium and chromium-driver (.ci/run does)"
    return None


pytestmark = pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two indexes (two tiny models) served side by side on a free localhost port, in a thread."""
    import uvicorn

    root = tmp_path_factory.mktemp("browser")
    make_shapes(root / "shapes", n_train=30, n_val=0, image_size=48)
    indexes = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = save_model(build_model(ModelConfig(arch="cliptune-tiny-vit")), root / f"model{seed}")
        indexes.append(Index.build(model, root / "shapes" / "train.csv", root / f"index{seed}", workers=0))
    port = _free_port()
    app = create_app([Served(indexes[0], "A: fine-tuned"), Served(indexes[1], "B: base")])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", indexes
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _grid_ids(browser, column: int) -> list[int]:
    from selenium.webdriver.common.by import By

    cards = browser.find_elements(By.CSS_SELECTOR, f'section.column[data-index="{column}"] .hit')
    return [int(card.get_attribute("data-id")) for card in cards]


def _wait_searches(browser, count: int) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(
        lambda b: b.find_element("tag name", "body").get_attribute("data-searches") == str(count)
    )


@pytest.mark.slow
def test_page_searches_by_text_and_by_clicking_a_result(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, indexes = server
    browser.get(url + "/")
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("5")
    box = browser.find_element(By.ID, "q")
    box.send_keys("a big red square")
    box.submit()
    _wait_searches(browser, 1)
    for column, index in enumerate(indexes):  # both grids: k results, in the order Index.search gives
        assert _grid_ids(browser, column) == [h.id for h in index.search(text="a big red square", k=5)]
    images = browser.find_elements(By.CSS_SELECTOR, "section.column img")
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) for i in images)

    clicked = _grid_ids(browser, 0)[2]
    browser.find_elements(By.CSS_SELECTOR, 'section.column[data-index="0"] .hit')[2].click()
    _wait_searches(browser, 2)
    assert _grid_ids(browser, 0)[0] == clicked  # the clicked image is its own nearest neighbour
    assert _grid_ids(browser, 0) == [h.id for h in indexes[0].search(embedding=indexes[0].embedding(clicked), k=5)]
    assert "5 results" in browser.find_element(By.ID, "status").text

    picked = indexes[1].meta["path"][11]
    browser.find_element(By.ID, "file").send_keys(picked)  # "Search by image...": pick a file
    _wait_searches(browser, 3)
    assert _grid_ids(browser, 1)[0] == 11 and _grid_ids(browser, 0)[0] == indexes[0].id_of(picked)
    shot = tmp_path / "search-page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
