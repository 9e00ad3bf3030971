"""The web page in headless Chromium (Debian's, driven by Selenium): ask about a SQuAD
paragraph and see the right answer highlighted in it; generate text and see the tokens
stream in; a screenshot of each tab is saved."""

import contextlib
import os
import shutil
import subprocess

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from canao.apps.service import Service
from canao.profiles import load_config
from tests.integration.conftest import running_server
from tests.unit.test_serve_generate import events

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,900")


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Debian's chromium and chromedriver (one source package, so their versions match),
    installed with apt-get when missing: (browser, driver)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr[-2000:]}"
    return shutil.which("chromium"), shutil.which("chromedriver")


@contextlib.contextmanager
def browser(chromium: tuple[str, str]):
    options = Options()
    options.binary_location = chromium[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=DriverService(executable_path=chromium[1]))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(memorized_qa, tiny_lm):
    """The URL of a server of both tasks."""
    with running_server(Service(str(memorized_qa[0]), load_config("serve", "tiny"), str(tiny_lm))) as url:
        yield url


def open_page(driver, url) -> WebDriverWait:
    driver.get(url)
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    return wait


def test_the_page_highlights_the_right_answer(chromium, server, memorized_qa, tmp_path):
    example = memorized_qa[1]
    with browser(chromium) as driver:
        version = httpx.get(f"{server}/v1/info").json()["models"]["qa"]["version"]
        wait = open_page(driver, server)
        model_line = driver.find_element(By.ID, "qa-model").text
        assert f"version {version}" in model_line and "torch on cpu (pytorch version=" in model_line
        assert driver.find_element(By.CSS_SELECTOR, "nav button[aria-selected=true]").text == "Question answering"
        assert [b.text for b in driver.find_elements(By.CSS_SELECTOR, "nav button")] == [
            "Question answering", "Text generation"]

        driver.find_element(By.ID, "qa-context").send_keys(example.context)
        driver.find_element(By.ID, "qa-question").send_keys(example.question)
        driver.find_element(By.ID, "qa-ask").click()
        mark = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#qa-highlighted mark")))
        assert mark.text == example.answers[0].text == "a copper statue of Christ"
        assert driver.find_element(By.ID, "qa-highlighted").text == example.context
        assert driver.find_element(By.ID, "qa-answer").text == mark.text
        assert "ms in the server" in driver.find_element(By.ID, "qa-facts").text
        screenshot = tmp_path / "qa-page.png"
        assert driver.save_screenshot(str(screenshot))
        print(f"screenshot: {screenshot}")

        # A question the server refuses: the page shows the 422's field and message.
        question = driver.find_element(By.ID, "qa-question")
        question.clear()
        question.send_keys(",".join(["a"] * 100))
        driver.find_element(By.ID, "qa-ask").click()
        wait.until(lambda d: d.find_element(By.ID, "qa-error").text)
        assert driver.find_element(By.ID, "qa-error").text.startswith("question: ")


def test_the_generation_tab_streams_tokens(chromium, server, tmp_path):
    prompt, new_tokens = "The capital of France is", 8
    body = {"prompt": prompt, "max_new_tokens": new_tokens, "chat": False}
    texts = [data["text"] for name, data in events(httpx.post(f"{server}/v1/generate", json=body, timeout=30))
             if name == "token"]
    assert len(texts) == new_tokens
    with browser(chromium) as driver:
        wait = open_page(driver, server)
        driver.find_element(By.XPATH, "//nav/button[text()='Text generation']").click()
        model = httpx.get(f"{server}/v1/info").json()["models"]["generate"]
        model_line = driver.find_element(By.ID, "generate-model").text
        assert f"version {model['version']}" in model_line and "context window 640 tokens" in model_line

        driver.find_element(By.ID, "gen-prompt").send_keys(prompt)
        tokens = driver.find_element(By.ID, "gen-max-new-tokens")
        assert tokens.get_attribute("max") == "32"  # the server's cap
        tokens.clear()
        tokens.send_keys(str(new_tokens))
        driver.find_element(By.ID, "gen-chat").click()  # raw continuation, as the request above
        driver.find_element(By.ID, "gen-run").click()
        wait.until(lambda d: d.find_element(By.ID, "gen-facts").text or d.find_element(By.ID, "gen-error").text)
        assert driver.find_element(By.ID, "gen-error").text == ""
        output = driver.find_element(By.ID, "gen-output")
        assert output.get_attribute("data-tokens") == str(new_tokens)  # one update per token event
        assert output.get_attribute("textContent") == "".join(texts)  # greedy: what the server streams
        facts = driver.find_element(By.ID, "gen-facts").text
        assert facts.startswith(f"{new_tokens} tokens · first token after ") and "ms/token" in facts
        screenshot = tmp_path / "generation-page.png"
        assert driver.save_screenshot(str(screenshot))
        print(f"screenshot: {screenshot}")

        # A request the server refuses (the form's own checks let blank text through): the 422's field and message.
        prompt_box = driver.find_element(By.ID, "gen-prompt")
        prompt_box.clear()
        prompt_box.send_keys("   ")
        driver.find_element(By.ID, "gen-run").click()
        wait.until(lambda d: d.find_element(By.ID, "gen-error").text)
        assert driver.find_element(By.ID, "gen-error").text.startswith("prompt: ")
