"""app.py's page as the browser tests drive it (`Page`), served on 127.0.0.1 for a module's tests
(`serve_app`), and the app's Python side with an injected detector (`make_app`): shared by
tests/test_app.py, tests/test_app_hq.py and tests/test_app_restore.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.media import FakeDetector
from tests.ports import free_port
from webapp import jobs

WAIT = 60  # seconds any one step of the page may take on 2 busy cores


@contextmanager
def serve_app(demo) -> Iterator[str]:
    """`demo` (webapp.page.build_app's Blocks) served on 127.0.0.1 (no share link) at the URL yielded, and
    closed on the way out."""
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def make_app(tmp_path: Path) -> jobs.App:
    """The page's Python side with no models loaded yet and the injected detector, working in `tmp_path`."""
    return jobs.App(jobs.Models(None, FakeDetector(), None), jobs.Workspace(tmp_path / "workspace"))


class Page:
    """The app's page in the browser: named steps, each waiting explicitly, each leaving a screenshot."""

    def __init__(self, driver, url: str, shots: Path) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        shots.mkdir(exist_ok=True)
        self.driver, self.by, self.shots, self.step = driver, By, shots, len(list(shots.iterdir()))
        self.wait = lambda condition, timeout=WAIT: WebDriverWait(driver, timeout, 0.2).until(condition)
        driver.get(url)
        self.wait(lambda d: self.find("#face input[type=file]") and self.find("#audio input[type=file]"))

    def find(self, css: str) -> list:
        return self.driver.find_elements(self.by.CSS_SELECTOR, css)

    def shot(self, name: str) -> None:
        self.step += 1
        self.driver.save_screenshot(str(self.shots / f"{self.step:02d}-{name}.png"))

    def upload(self, component: str, path: Path) -> None:
        self.find(f"#{component} input[type=file]")[0].send_keys(str(path))
        self.wait(lambda d: self.find(f"#{component} button[aria-label=Clear]"))  # uploaded: it can be cleared

    def text(self, elem_id: str) -> str:
        return self.find(f"#{elem_id} textarea")[0].get_attribute("value")

    def click_and_wait_for(self, button: str, elem_id: str, words: str, timeout: float = WAIT) -> str:
        before = self.text(elem_id)
        self.find(f"#{button}")[0].click()
        self.wait(lambda d: self.text(elem_id) != before and words in self.text(elem_id), timeout)
        return self.text(elem_id)

    def type_into(self, elem_id: str, text: str) -> None:
        """Type `text` into a text box as a person does: select all, replace, leave the box (Tab)."""
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} input")[0]
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE, text, Keys.TAB)
        self.wait(lambda d: box.get_attribute("value") == text)

    def choose(self, elem_id: str, option: str) -> None:
        """Pick `option` of a dropdown as a person does: open it, click the option."""
        self.find(f"#{elem_id} input")[0].click()
        item = f'#{elem_id} li[role=option][aria-label="{option}"]'
        self.wait(lambda d: self.find(item) and self.find(item)[0].is_displayed())
        self.find(item)[0].click()
        self.wait(lambda d: self.find(f"#{elem_id} input")[0].get_attribute("value") == option)
