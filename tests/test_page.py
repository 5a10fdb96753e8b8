"""The web chat page in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium with
the system binaries, so nothing is downloaded): type a message, watch the reply stream in and its emotion
appear; the temperature control and "New chat" change what is sent; the page loads nothing from elsewhere.

`.ci/run` installs the browser when missing and sets PERSONA_LM_REQUIRE_BROWSER=1, so in CI a missing
browser fails instead of skipping."""

import httpx
import pytest

from conftest import Server, headless_chromium, tiny_model_dir

EMOTIONS = ["joy", "sadness", "anger"]
LINES = ["Hello there, how are you today?", "I am fine, thank you. 🙂", "Rosie likes tea and long talks.",
         "Tell me something nice.", "Café au lait, s'il vous plaît."]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = headless_chromium(tmp_path_factory.mktemp("chrome"))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tiny_model_dir(tmp_path_factory.mktemp("page"), LINES, EMOTIONS, block_size=128), "--max-new-tokens", "40")
    yield s
    s.close()


def send(driver, text: str) -> tuple[str, str]:
    """Type `text`, press Enter, wait for the reply's emotion tag; (reply text, emotion)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    before = len(driver.find_elements(By.CSS_SELECTOR, ".assistant .emotion"))
    driver.find_element(By.ID, "input").send_keys(text, Keys.ENTER)
    WebDriverWait(driver, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant .emotion")) > before)
    return driver.execute_script(
        "const m = document.querySelectorAll('.assistant');"
        "const last = m[m.length - 1];"
        "return [last.querySelector('.content').textContent, last.querySelector('.emotion').textContent];")


def test_typed_message_gets_a_streamed_reply_with_its_emotion(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "title").text == "Chat with Rosie")
    # Count every change to the reply's text while it arrives: a reply shown in one piece counts once.
    browser.execute_script(
        "window.updates = 0;"
        "new MutationObserver((ms) => { for (const m of ms) if (m.target.classList &&"
        " m.target.classList.contains('content')) window.updates++; })"
        ".observe(document.getElementById('log'), {subtree: true, childList: true});"
        "const t = document.getElementById('temperature'); t.value = '0'; t.dispatchEvent(new Event('input'));")
    assert browser.find_element(By.ID, "temperature-value").text == "0"
    reply, emotion = send(browser, "Hello there!")
    assert emotion in EMOTIONS
    assert browser.find_element(By.CSS_SELECTOR, ".user").text == "Hello there!"

    api = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "rosie", "temperature": 0, "messages": [{"role": "user", "content": "Hello there!"}]}).json()
    assert reply == api["choices"][0]["message"]["content"] and emotion == api["choices"][0]["message"]["emotion"]
    pieces = browser.execute_script("return window.updates")
    assert pieces > 3, f"the reply arrived in {pieces} piece(s), not streamed"

    # The second turn is sent with the history; after "New chat" the same text is sent alone.
    second, _ = send(browser, "Tell me more.")
    alone = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "rosie", "temperature": 0, "messages": [{"role": "user", "content": "Tell me more."}]}).json()
    with_history = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "rosie", "temperature": 0, "messages": [
            {"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": reply},
            {"role": "user", "content": "Tell me more."}]}).json()
    assert second == with_history["choices"][0]["message"]["content"]

    browser.find_element(By.ID, "new-chat").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#log .msg") == []
    fresh, _ = send(browser, "Tell me more.")
    assert fresh == alone["choices"][0]["message"]["content"]

    # Nothing but this server was contacted: no CDN, works offline.
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(server.url + "/") for u in urls), urls


def test_page_has_no_external_references(server):
    html = httpx.get(server.url + "/", timeout=10).text
    assert "<script src" not in html and "<link" not in html and "http://" not in html and "https://" not in html
