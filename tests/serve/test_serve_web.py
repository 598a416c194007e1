"""The web playground end to end in headless Chromium (Debian's chromium + chromium-driver via selenium):
type a prompt, watch the streamed answer arrive, read its usage and cost."""

from __future__ import annotations

import shutil

import pytest
from serve_support import LiveServer, make_model_dir

from deepseek.serve.api import create_app
from deepseek.serve.billing import Billing
from deepseek.serve.engine import Engine, EngineConfig

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")


def chromium_paths():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    path, driver = chromium_paths()
    if not (path and driver):
        pytest.skip("chromium / chromedriver are not installed: run scripts/ci_services.sh")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = path
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(flag)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    yield b
    b.quit()


def test_playground_streams_an_answer_with_reasoning_and_cost(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    engine = Engine.from_pretrained(str(make_model_dir(tmp_path / "m")), EngineConfig(max_running=4))
    billing = Billing(f"sqlite:///{tmp_path / 'u.db'}")
    app = create_app(engine, billing, auth=True)
    secret, _ = billing.create_key("browser", tier="basic")
    try:
        with LiveServer(app) as live:
            browser.get(live.url + "/")
            wait = WebDriverWait(browser, 30)
            browser.find_element(By.ID, "key").send_keys(secret)
            browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
            wait.until(lambda b: b.find_element(By.ID, "model").get_attribute("value") == engine.model_name)
            assert "$0.001 / 1K tokens" in browser.find_element(By.ID, "pricing").text
            browser.find_element(By.ID, "temperature").clear()
            browser.find_element(By.ID, "temperature").send_keys("0")
            browser.find_element(By.ID, "max_tokens").clear()
            browser.find_element(By.ID, "max_tokens").send_keys("12")
            browser.find_element(By.ID, "prompt").send_keys("Hello world")
            browser.find_element(By.ID, "send").click()
            box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))
            usage = box.find_element(By.CLASS_NAME, "usage").text
            reasoning = browser.execute_script("return document.querySelector('.msg.assistant .think').textContent")
            app.state.server.writer.flush()
            row = billing.usage_records()[-1]
            assert f"{row['completion_tokens']} completion tokens" in usage and "$0.0000" in usage
            assert row["status"] == "ok" and row["completion_tokens"] >= 1
            # a reply stopped at the limit says so (finish_reason "length"), one that ended by itself does not
            assert ("stopped at the max tokens limit" in usage) == (row["completion_tokens"] == 12)
            # the streamed reasoning equals what the API returns for the same greedy request
            from deepseek.chat import chat_prompt_ids
            from deepseek.serve.sequence import SamplingParams

            ids = chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": "Hello world"}])
            assert reasoning == engine.generate(ids, SamplingParams(max_tokens=12)).reasoning
            assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == "Hello world"
    finally:
        engine.close()


def test_playground_attaches_an_image_and_shows_it(tmp_path, browser):
    """A PNG attached in the page goes out as an image_url part, shows in the user bubble, and the answer's
    prompt tokens include the image's placeholder tokens (the same request through the API gives the same)."""
    from mm_support import make_mm_model_dir, png_bytes
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    engine = Engine.from_pretrained(str(make_mm_model_dir(tmp_path / "mm")), EngineConfig(max_running=2))
    (tmp_path / "seven.png").write_bytes(png_bytes())
    try:
        with LiveServer(create_app(engine)) as live:
            browser.get(live.url + "/")
            wait = WebDriverWait(browser, 30)
            wait.until(lambda b: b.find_element(By.ID, "model").get_attribute("value") == engine.model_name)
            browser.find_element(By.ID, "max_tokens").clear()
            browser.find_element(By.ID, "max_tokens").send_keys("3")
            browser.find_element(By.ID, "attach").send_keys(str(tmp_path / "seven.png"))
            browser.find_element(By.ID, "prompt").send_keys("Which digit?")
            browser.find_element(By.ID, "send").click()
            box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))
            assert "Error" not in box.text, box.text
            img = browser.find_element(By.CSS_SELECTOR, ".msg.user img.media")
            assert img.get_attribute("src").startswith("data:image/png;base64,")
            assert browser.execute_script("return document.querySelector('.msg.user img').naturalWidth") == 9
            K = engine.model.multimodal.config.tokens_per_item
            prompt_tokens = int(box.find_element(By.CLASS_NAME, "usage").text.split()[0])
            text_only = len(engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": "Which digit?"}], add_generation_prompt=True))  # fmt: skip
            assert prompt_tokens >= text_only + K
    finally:
        engine.close()
