"""The web UI's fixtures: a tiny chat model and dataset, the UI served on a free port, and the
system's headless Chromium driven through its own chromedriver (never a downloaded browser)."""

import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's packages (scripts/install.sh)


@pytest.fixture(scope="session")
def model(tmp_path_factory, make_tiny_llama, chat_tokenizer):
    """A tiny Llama with SmolLM2's vocabulary and tokenizer (ChatML); with FOURBIT_WEBUI_MODEL=embedded,
    "" (the form's empty field: the embedded SmolLM2-135M-Instruct, for the README's screenshots)."""
    if os.environ.get("FOURBIT_WEBUI_MODEL") == "embedded":
        return ""
    folder = tmp_path_factory.mktemp("webui-model")
    make_tiny_llama(folder, seed=3, vocab_size=len(chat_tokenizer), max_position_embeddings=256, initializer_range=0.5)
    chat_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    rows = [{"instruction": f"What is {a} plus {b}?", "output": str(a + b)} for a in range(4) for b in range(4)]
    path = tmp_path_factory.mktemp("webui-data") / "sums.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``served(auth=None)``: the UI on a free port over a fresh working folder; (url, workdir, app)."""
    from fourbit.webui.app import launch

    apps = []

    def serve(auth=None):
        workdir = tmp_path_factory.mktemp("webui-work")
        port = free_port()
        apps.append(launch(workdir, port=port, auth=auth, block=False))
        return f"http://127.0.0.1:{port}/", workdir, apps[-1]

    yield serve
    for app in apps:
        if app.chat.engine is not None:
            app.chat.engine.close()
        app.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium with the flags that keep it off the network (no updates, no sync)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert shutil.which(CHROMEDRIVER), "chromedriver missing: `bash scripts/install.sh test` installs Debian's"
    os.environ.update(SE_OFFLINE="true", SE_AVOID_STATS="true")  # Selenium downloads nothing, reports nothing
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield Page(driver)
    driver.quit()


class Page:
    """The few gestures the tests make, by the elem_id each component has in webui/."""

    def __init__(self, driver):
        self.driver = driver
        shots = os.environ.get("FOURBIT_SCREENSHOTS")  # e.g. docs/: the README's pictures
        self.shots = Path(shots) if shots else None

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.wait(lambda: self.find("#tabs"))

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        found = self.driver.find_elements(By.CSS_SELECTOR, css)
        return found[0] if found else None

    def all(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, elem_id: str) -> str:
        element = self.find(f"#{elem_id}")
        return element.text if element is not None else ""

    def wait(self, condition, seconds: float = 60.0, what: str = ""):
        deadline = time.monotonic() + seconds
        while True:
            try:
                value = condition()
            except Exception:  # an element replaced while read: look again
                value = None
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
            time.sleep(0.1)

    def wait_text(self, elem_id: str, predicate, seconds: float = 60.0) -> str:
        return self.wait(lambda: predicate(self.text(elem_id)) and self.text(elem_id), seconds,
                         f"#{elem_id}; it shows {self.text(elem_id)!r}")

    def fill(self, elem_id: str, value) -> None:
        from selenium.webdriver.common.keys import Keys

        # Typed again until the box holds it: a number box's page script can rewrite a value typed
        # half-way ("5e" of "5e-3" is no number) when the page is slow to answer (seen on a busy
        # machine: "5e-3" arrived as "-3").
        for _ in range(3):
            box = self.wait(lambda: self.find(f"#{elem_id} textarea, #{elem_id} input"), what=f"#{elem_id}")
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(Keys.DELETE)
            box.send_keys(str(value))
            time.sleep(0.2)
            if _same_value(box.get_attribute("value"), str(value)):
                return
        raise AssertionError(f"#{elem_id} holds {box.get_attribute('value')!r} after typing {value!r} three times")

    def choose(self, elem_id: str, option: str) -> None:
        self.find(f"#{elem_id} input").click()
        item = self.wait(lambda: next((o for o in self.all(f"#{elem_id} ul li") if o.text.strip(" ✓\n") == option), None),
                         what=f"option {option!r} of #{elem_id}")
        item.click()
        self.wait(lambda: self.find(f"#{elem_id} input").get_attribute("value") == option, what=f"#{elem_id} = {option}")

    def click(self, elem_id: str) -> None:
        self.wait(lambda: self.find(f"#{elem_id}"), what=f"#{elem_id}").click()

    def tab(self, name: str) -> None:
        self.wait(lambda: next((t for t in self.all("button[role=tab]") if t.text == name), None)).click()

    def screenshot(self, name: str) -> None:
        """The page as shown, into $FOURBIT_SCREENSHOTS (when set)."""
        if self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)
            self.driver.save_screenshot(str(self.shots / f"webui-{name}.png"))


def _same_value(shown: str, typed: str) -> bool:
    """What a box shows is what was typed (a number box may write "5e-3" as "0.005")."""
    if shown == typed:
        return True
    try:
        return float(shown) == float(typed)
    except ValueError:
        return False
