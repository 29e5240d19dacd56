"""The console in real headless Chromium (Debian's chromium and chromedriver, driven by Selenium):
sign in, filter the task list, open a conversation with a tool call and an interrupted round, see
the latency charts, play a TTS sample, delete a task. A machine without the browser fails here
with the reason (`make browser` installs it); it is never skipped."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.conftest import ADMIN_KEY, CALLBACK_KEY
from tests.support import Proxy, marker
from tests.test_admin import _callback, _chat, _get

# Where the run also saves its screenshot of a conversation (the README's picture).
SCREENSHOT_ENV = "CONSOLE_SCREENSHOT"


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("Debian's chromium and chromium-driver are not installed: run `make browser` (make test does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never try to download anything
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--autoplay-policy=no-user-gesture-required", "--window-size=1280,1100", f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def console(start_proxy) -> Proxy:
    return start_proxy({"ADMIN_API_KEYS": ADMIN_KEY, "CALLBACK_SIGN_KEY": CALLBACK_KEY, "BUILTIN_TOOLS": "true"}, args=())


def _wait(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float = 15) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition, message=f"waiting for {what}")


def _visible(driver: Any, selector: str) -> bool:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return bool(found) and found[0].is_displayed()


def _played_seconds(driver: Any, what: str) -> float:
    """The playground's audio element's duration, once it knows one."""
    script = "const a = document.querySelector('#tts-audio'); return isFinite(a.duration) && a.duration;"
    return float(_wait(driver, lambda d: d.execute_script(script), what, timeout=30))


def _speak_as(driver: Any, fmt: str) -> None:
    """The playground's sample again in another format, its player emptied first (so the next
    duration read is the new clip's)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "tts-format")).select_by_value(fmt)
    driver.execute_script("const a = document.querySelector('#tts-audio'); a.removeAttribute('src'); a.load();")
    driver.find_element(By.ID, "tts-speak").click()


def test_console_end_to_end(console: Proxy, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    tag = marker()
    user, task_id, other_task = f"user-{tag}", f"task-{tag}", f"task-{tag}-other"
    # Round 1 calls a server tool; round 2 is cut by a 905 to what was heard.
    _chat(console, task_id, f'{tag} [[say:Let me look.]] [[tool:current_time:{{"timezone": "UTC"}}]]', user)
    reply = "Sure. The table for two is booked at eight, and I sent the confirmation."
    _chat(console, task_id, f"{tag} book it [[reply:{reply}]]", user)
    _callback(console, task_id, 905, {"UserId": "bot", "RoundId": f"r-{tag}", "Text": "Sure."})
    _callback(console, task_id, 906, {"Metric": "llm_first_token", "Value": 640, "Tag": {"RoundId": f"r-{tag}"}})
    _chat(console, other_task, f"{tag} hello", f"other-{tag}")
    _callback(console, task_id, 902, {"LeaveCode": 99})

    browser.get(console.url + "/console")
    _wait(browser, lambda d: _visible(d, "#signin-view"), "the sign-in form")
    browser.find_element(By.ID, "key").send_keys("not-the-key")
    browser.find_element(By.ID, "signin-button").click()
    _wait(browser, lambda d: "refused" in d.find_element(By.ID, "signin-error").text, "a refused key's message")
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys(ADMIN_KEY)
    browser.find_element(By.ID, "signin-button").click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'#tasks tr[data-task="{other_task}"]'), "the task list")

    browser.find_element(By.CSS_SELECTOR, '#filters input[name="user_id"]').send_keys(user)
    browser.find_element(By.ID, "filter").click()
    _wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, f'#tasks tr[data-task="{other_task}"]'), "the filter")
    rows = browser.find_elements(By.CSS_SELECTOR, "#tasks tbody tr")
    assert [row.get_attribute("data-task") for row in rows] == [task_id]
    assert rows[0].find_elements(By.TAG_NAME, "td")[5].text == "2"

    rows[0].click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rounds .round")) == 2, "the conversation")
    first, second = browser.find_elements(By.CSS_SELECTOR, "#rounds .round")
    tool = first.find_element(By.CSS_SELECTOR, "details.tool-call")
    assert "current_time" in tool.find_element(By.TAG_NAME, "summary").text
    assert tool.get_attribute("open") is None  # folded
    assert "interrupted" in second.find_element(By.TAG_NAME, "header").text
    meta = browser.find_element(By.ID, "conversation-meta").text
    assert "(LeaveCode 99)" in meta and "2 rounds" in meta
    # The page names its icon (none), so the browser asks for no /favicon.ico.
    assert browser.find_element(By.CSS_SELECTOR, 'link[rel="icon"]').get_attribute("href") == "data:,"
    struck = second.find_element(By.CSS_SELECTOR, ".unheard")
    assert struck.text.strip() == reply.removeprefix("Sure.").strip()
    assert struck.value_of_css_property("text-decoration-line") == "line-through"
    assert second.find_element(By.CSS_SELECTOR, ".heard").text == "Sure."
    assert len(browser.find_elements(By.CSS_SELECTOR, "#round-latency rect.proxy-ttft")) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#round-latency rect.orchestrator-ttft")) == 1
    screenshot = tmp_path / "console.png"
    browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copy(screenshot, os.environ[SCREENSHOT_ENV])

    browser.find_element(By.CSS_SELECTOR, 'a[data-view="latency"]').click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#hourly-chart polyline.hourly-p50"), "the hourly chart")
    assert "3 rounds" in browser.find_element(By.ID, "stats-total").text

    browser.find_element(By.CSS_SELECTOR, 'a[data-view="tts"]').click()
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#tts-voice option"), "the voice list")
    browser.find_element(By.ID, "tts-speak").click()
    assert _played_seconds(browser, "the sample's audio") > 1.0  # "Hello! This is how I sound on the phone." is about two seconds
    assert browser.find_element(By.ID, "first-audio").text.isdigit()
    assert browser.find_element(By.ID, "tts-error").text == ""
    # Ogg Opus plays in the same player (Chromium decodes it natively).
    _speak_as(browser, "ogg_opus")
    assert _played_seconds(browser, "the Opus sample's audio") > 1.0
    # MP3 plays as it arrives (Media Source); its duration is known once the stream has ended.
    _speak_as(browser, "mp3")
    _wait(browser, lambda d: d.find_element(By.ID, "all-audio").text.isdigit(), "the MP3 stream's end")
    assert browser.execute_script("return document.querySelector('#tts-audio').dataset.streamed") == "true"
    assert _played_seconds(browser, "the MP3 sample's audio") > 1.0
    # OpenAI's speech API from the same playground: its formats, 24 kHz; speed by time stretch.
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "tts-api")).select_by_value("openai")
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#tts-format option")]
    assert options == ["mp3", "opus", "aac", "flac", "wav", "pcm"]
    rate = Select(browser.find_element(By.ID, "tts-rate"))
    assert rate.first_selected_option.text == "24000" and not browser.find_element(By.ID, "tts-rate").is_enabled()
    normal = {}
    for fmt in ("flac", "opus", "pcm"):
        _speak_as(browser, fmt)
        normal[fmt] = _played_seconds(browser, f"the speech API's {fmt} audio")
        assert normal[fmt] > 1.0 and browser.find_element(By.ID, "tts-error").text == ""
    speed = browser.find_element(By.ID, "tts-speed")
    speed.clear()
    speed.send_keys("2")
    _speak_as(browser, "pcm")
    assert _played_seconds(browser, "the faster audio") < 0.7 * normal["pcm"]

    browser.get(f"{console.url}/console/#task/{task_id}")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rounds .round")) == 2, "the conversation again")
    browser.find_element(By.ID, "delete-task").click()
    _wait(browser, lambda d: _visible(d, "#confirm"), "the confirmation")
    assert task_id in browser.find_element(By.ID, "confirm-text").text
    browser.find_element(By.ID, "confirm-ok").click()
    _wait(browser, lambda d: _visible(d, "#tasks-view"), "the task list after the delete")
    assert _get(console, f"/admin/v1/tasks/{task_id}").status_code == 404
    assert _get(console, f"/admin/v1/tasks/{other_task}").status_code == 200


def test_console_serves_only_its_files_under_a_strict_policy(console: Proxy) -> None:
    page = httpx.get(console.url + "/console", follow_redirects=True)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(console.url + "/console/../core/settings.py").status_code == 404
    assert httpx.get(console.url + "/console/secret.txt").status_code == 404


def test_console_shows_a_tasks_summary_and_its_users_memory(start_proxy, upstream: Any, browser: Any, tmp_path: Path) -> None:
    """A profile with both kinds of memory: the conversation view shows the task's summary and
    what is remembered of its user; "delete this user's data" goes to the memory's user (a
    MetaInfo id here, not the task's X-User-Id), and takes the memory along."""
    from selenium.webdriver.common.by import By

    from tests.test_user_memory import _ask, _end, _memory, wait_until

    config = tmp_path / "profiles.yaml"
    config.write_text(
        "profiles:\n  - name: companion\n    default: true\n    history: {max_rounds: 2}\n"
        f"    memory: {{summary: true, per_user: true, upstream: {{base_url: '{upstream.base_url}', model: 'm[[summarize:1]]'}}}}\n"
    )
    server = start_proxy({"ADMIN_API_KEYS": ADMIN_KEY, "CALLBACK_SIGN_KEY": CALLBACK_KEY, "CONFIG_FILE": str(config)},
                         in_process=True)
    tag = marker()
    app, user = f"app-{tag}", f"user-{tag}"
    _ask(server, f"task-{tag}-1", f"{tag} my dog is called Rex", user=user, app=app)
    _end(server, f"task-{tag}-1")
    wait_until(lambda: _memory(server, app, user), timeout=30, what="the user's memory")
    task_id = f"task-{tag}-2"
    for n in range(6):
        _ask(server, task_id, f"{tag} round {n}", user=user, app=app)
    wait_until(lambda: httpx.get(server.url + f"/admin/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
               .json()["summary"], timeout=30, what="the task's summary")

    browser.get(server.url + "/console")
    browser.execute_script(f"sessionStorage.setItem('trtc-admin-key', {ADMIN_KEY!r}); location.hash = 'task/{task_id}';")
    _wait(browser, lambda d: "Rex" in d.find_element(By.ID, "conversation-user-memory").text, "the user's memory")
    assert f"Memory of user {user}" in browser.find_element(By.ID, "conversation-user-memory").text
    assert f"User: {tag} round 0" in browser.find_element(By.ID, "conversation-summary").text
    browser.find_element(By.ID, "delete-user").click()
    _wait(browser, lambda d: _visible(d, "#confirm"), "the confirmation")
    assert user in browser.find_element(By.ID, "confirm-text").text
    browser.find_element(By.ID, "confirm-ok").click()
    _wait(browser, lambda d: _visible(d, "#tasks-view"), "the task list after the delete")
    assert _memory(server, app, user) == []
    assert _get(server, f"/admin/v1/tasks/{task_id}").status_code == 404


def test_console_knowledge_page_and_the_passages_beside_a_reply(start_proxy, browser: Any, tmp_path: Path) -> None:
    """Upload a document on the Knowledge page, try a query, see the passages a round used beside
    its reply, delete the document."""
    from selenium.webdriver.common.by import By

    tag = marker()
    base = f"kb-{tag}"
    config = tmp_path / "profiles.yaml"
    config.write_text(f"profiles:\n  - name: support\n    default: true\n    tools: []\n"
                      f"    knowledge: {{bases: [{base}], top_k: 1}}\n")
    server = start_proxy({"ADMIN_API_KEYS": ADMIN_KEY, "CONFIG_FILE": str(config)}, in_process=True)
    document = tmp_path / "warranty.md"
    document.write_text("# Warranty\n\nThe speaker has a two year warranty.\n\n# Shipping\n\nOrders ship in two days.\n")

    browser.get(server.url + "/console")
    browser.execute_script(f"sessionStorage.setItem('trtc-admin-key', {ADMIN_KEY!r}); location.hash = 'knowledge';")
    _wait(browser, lambda d: _visible(d, "#knowledge-view"), "the knowledge page")
    browser.find_element(By.ID, "kb-base").send_keys(base)
    browser.find_element(By.ID, "kb-file").send_keys(str(document))
    browser.find_element(By.ID, "kb-add").click()
    _wait(browser, lambda d: f"{base}/warranty: 2 chunks" in d.find_element(By.ID, "kb-status").text, "the upload")
    assert base in browser.find_element(By.ID, "kb-bases").text
    assert "warranty" in browser.find_element(By.ID, "kb-documents").text
    browser.find_element(By.ID, "kb-query").send_keys("how long is the warranty")
    browser.find_element(By.ID, "kb-try").click()
    _wait(browser, lambda d: "two year warranty" in d.find_element(By.ID, "kb-results").text, "the search results")

    task_id = f"task-{tag}"
    _chat(server, task_id, f"what warranty does the speaker have? {tag}", "user-1")
    browser.execute_script(f"location.hash = 'task/{task_id}';")
    _wait(browser, lambda d: f"{base} / warranty #" in d.find_element(By.ID, "rounds").text, "the passages beside the reply")

    browser.execute_script("location.hash = 'knowledge';")
    _wait(browser, lambda d: base in d.find_element(By.ID, "kb-bases").text, "the bases")
    browser.find_element(By.LINK_TEXT, base).click()
    _wait(browser, lambda d: "warranty" in d.find_element(By.ID, "kb-documents").text, "the documents")
    browser.find_element(By.CSS_SELECTOR, "#kb-docs button.danger").click()
    _wait(browser, lambda d: _visible(d, "#confirm"), "the confirmation")
    browser.find_element(By.ID, "confirm-ok").click()
    _wait(browser, lambda d: "0" in d.find_element(By.ID, "kb-bases").text.split(base, 1)[1][:6], "the delete")
    assert _get(server, f"/admin/v1/knowledge/{base}/documents/warranty").status_code == 404
