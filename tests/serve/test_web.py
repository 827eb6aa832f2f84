"""`lmm web` as a subprocess on 127.0.0.1, driven in headless chromium through selenium: an
uploaded image and a question get the streamed answer `lmm.load(...).generate` gives."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.evaluation.test_chat import model, trained_run  # noqa: F401  (fixtures)
from tests.helpers import running_server
from tests.serve.test_serve import COLOURS, free_port, png

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "images" / "web_demo.png"
QUESTION = "What colour is the shape in this picture?"
MAX_TOKENS = 24


def browser() -> tuple[str, str]:
    """Debian's chromium and chromedriver; in CI (`CI` set) their absence fails the test."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    message = "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; .ci/run installs them")
    pytest.skip(message)


@pytest.fixture(scope="module")
def web(trained_run, tmp_path_factory):  # noqa: F811
    """One `lmm web` subprocess for the module; yields its URL."""
    if not os.environ.get("CI"):  # in CI (the dev extra) a missing gradio is a failure
        pytest.importorskip("gradio")
    log = tmp_path_factory.mktemp("web") / "web.log"
    port = free_port()
    command = [sys.executable, "-m", "lmm.cli", "web", str(trained_run), "--port", str(port),
               "--title", "tiny quickstart"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    url = f"http://127.0.0.1:{port}/"
    with running_server(command, env, log, url, "lmm web"):
        yield url


def test_web_demo_in_browser(web, model, tmp_path):  # noqa: F811
    chromium, chromedriver = browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "shape.png"
    image.write_bytes(png(COLOURS[2], (32, 32)))
    content = [{"type": "image", "image": str(image)}, {"type": "text", "text": QUESTION}]
    expected = model.generate([{"role": "user", "content": content}], max_new_tokens=MAX_TOKENS)
    assert expected.strip()  # an empty answer would prove nothing

    options = Options()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(web)
        box = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#question textarea")))
        # the sampling settings: max tokens through its number field
        driver.find_element(By.XPATH, "//button[contains(., 'Sampling')]").click()
        tokens = wait.until(
            ec.visibility_of_element_located((By.CSS_SELECTOR, "#max-tokens input[type=number]"))
        )
        tokens.send_keys(Keys.CONTROL, "a")
        tokens.send_keys(str(MAX_TOKENS), Keys.TAB)

        upload = driver.find_element(By.CSS_SELECTOR, "#question input[type=file]")
        upload.send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question img"))  # the thumbnail
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)

        def answer(d) -> str | None:
            """The bot's reply once the box takes input again (the stream has ended)."""
            textarea = d.find_element(By.CSS_SELECTOR, "#question textarea")
            replies = d.find_elements(By.CSS_SELECTOR, "#chat .message.bot")
            if not replies or not textarea.is_enabled():
                return None
            return replies[-1].get_attribute("textContent")

        text = wait.until(answer)
        shown = driver.find_elements(By.CSS_SELECTOR, "#chat .message.user img")
        assert shown, "the uploaded image is shown in the user's turn"
        assert QUESTION in driver.find_element(By.CSS_SELECTOR, "#chat").text
        # docs/images/web_demo.png is rewritten only on request (LMM_UPDATE_SCREENSHOT=1): a
        # test run leaves the repository as it was
        shot = (
            SCREENSHOT if os.environ.get("LMM_UPDATE_SCREENSHOT") == "1" else tmp_path / "web.png"
        )
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 0
    finally:
        driver.quit()
    assert text.strip() == expected.strip()


def test_web_turns_take_images_and_a_video(model, synthetic_data, tmp_path):  # noqa: F811
    """The demo's turns (no browser): two images, then a video, kinds read from content; the
    streamed reply grows to `generate`'s answer; a seeded sampled reply repeats."""
    pytest.importorskip("av")
    from lmm.web import WebChat, shown_turn, user_turn
    from tests.data.test_video import write_video

    images = sorted((synthetic_data / "images").glob("*.png"))[:2]
    clip = write_video(tmp_path / "clip.mp4", n=12).rename(tmp_path / "clip.bin")  # no suffix
    chat = WebChat(model)
    first = user_turn("  Same shape?  ", [str(p) for p in images])
    assert [p["type"] for p in first["content"]] == ["image", "image", "text"]
    assert first["content"][-1]["text"] == "Same shape?"
    assert [m["content"] for m in shown_turn(first)][1:] == [
        {"path": str(images[1])},
        "Same shape?",
    ]
    growing = list(chat.reply([first], 8, 0.0, 1.0, 0))
    assert all(b.startswith(a) for a, b in zip(growing, growing[1:], strict=False))
    assert growing[-1] == model.generate([first], max_new_tokens=8)

    second = user_turn("And this?", [str(clip)])
    assert [p["type"] for p in second["content"]] == ["video", "text"]
    messages = [first, {"role": "assistant", "content": growing[-1]}, second]
    *_, greedy = chat.reply(messages, 6, 0.0, 1.0, 0)
    assert greedy == model.generate(messages, max_new_tokens=6)
    *_, sampled = chat.reply(messages, 6, 1.5, 0.9, 7)
    *_, again = chat.reply(messages, 6, 1.5, 0.9, 7)
    assert (
        sampled
        == again
        == model.generate(messages, max_new_tokens=6, temperature=1.5, top_p=0.9, seed=7)
    )
