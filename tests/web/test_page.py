"""The web page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) against the real server:
uvicorn on a free loopback port in a thread, the tiny chat model, API keys enabled.

Run as a script, it serves the default model instead and saves a screenshot of the page in use:

    python tests/web/test_page.py docs/web.png
"""

from __future__ import annotations

import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from playwright.sync_api import Browser, Page, Request, expect, sync_playwright

from model import FamConfig, FamRuntime
from server.app import create_app
from server.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (tests may run as root); no background connections (the test machine has no network).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
KEY, OTHER_KEY = "web-test-key", "web-test-key-2"  # two owners: each test sees only its own sessions
DOCUMENT = (
    "# Harbour Bridge maintenance report, 2025\n\n"
    "The inspection team examined all 112 cable anchors of the Harbour Bridge between March and May 2025. "
    "Corrosion was found on 9 anchors of the east span; all 9 were repainted in June. The works cost 1.4 "
    "million euros, 12% under the budget. The next full inspection is planned for spring 2027.\n\n"
)
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install chromium")


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on a free loopback port; yields the base URL once /health is 200."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 300
        while not (server.started and httpx.get(f"{url}/health").status_code == 200):
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def record_progress(page: Page) -> None:
    """Keep every text the progress line shows in window.progressTexts (an ingest can end within one frame)."""
    page.evaluate("""() => {
        window.progressTexts = [];
        new MutationObserver(() => window.progressTexts.push(document.getElementById("progress-text").textContent))
            .observe(document.getElementById("progress-text"), {childList: true, characterData: true, subtree: true});
    }""")


def read_file(page: Page, path: Path, button: str) -> list[str]:
    """Choose `path`, press the ingest `button` and wait for the end; returns the progress texts shown."""
    record_progress(page)
    page.set_input_files("#file", str(path))
    page.click(button)
    expect(page.locator("#progress-text")).to_contain_text("Done:", timeout=TIMEOUT_MS)
    return page.evaluate("window.progressTexts")


def ask(page: Page, question: str) -> str:
    page.fill("#question", question)
    page.press("#question", "Enter")
    answer = page.locator(".turn .a").last
    expect(page.locator("#ask")).to_be_enabled(timeout=TIMEOUT_MS)
    expect(answer).to_have_class("a")
    return answer.inner_text()


def session_rows(page: Page):
    return page.locator("#sessions tr")


@pytest.fixture(scope="module")
def server_url(tiny_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    runtime = FamRuntime.load(tiny_chat_dir, fam=FamConfig(block_size=16, memory_blocks=1, fam_len=4),
                              dtype="float32", device="cpu")
    settings = Settings(data_dir=tmp_path_factory.mktemp("web") / "data", secret="web", api_keys=f"{KEY},{OTHER_KEY}")
    with serve(create_app(settings, runtime)) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser: Browser, server_url: str) -> Iterator[Page]:
    """A fresh page (empty localStorage) at the server's /, failing the test on any JavaScript error."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(server_url)
    yield page
    context.close()
    assert not errors, errors


def test_read_ask_and_delete_with_an_api_key(page: Page, server_url: str, tmp_path: Path, pdf_bytes) -> None:
    # without a key the server refuses /v1 and the page says so in the server's words
    expect(page.locator("#error-text")).to_have_text(
        "a valid API key is required (Authorization: Bearer <key>)", timeout=TIMEOUT_MS
    )
    expect(page.locator("#health")).to_have_text(httpx.get(f"{server_url}/health").json()["model"])
    page.fill("#api-key", KEY)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#no-sessions")).to_be_visible()
    assert page.evaluate("localStorage.getItem('fam.apiKey')") == KEY

    api_calls: list[Request] = []
    page.on("request", lambda request: api_calls.append(request) if "/v1/" in request.url else None)

    text = tmp_path / "report.md"
    text.write_text(DOCUMENT * 4)
    page.select_option("#mode", "bswa")
    progress = read_file(page, text, "#ingest-new")
    assert any(" tokens · " in shown and "tokens/s" in shown for shown in progress), progress
    expect(session_rows(page)).to_have_count(1)
    row = session_rows(page).first
    expect(row).to_contain_text("report.md")
    expect(row).to_contain_text("bswa")
    expect(row).to_have_class("selected")
    tokens = int(row.locator("td.num").first.inner_text().replace(",", ""))
    assert tokens > 0

    pdf = tmp_path / "appendix.pdf"
    pdf.write_bytes(pdf_bytes(["Appendix, page one: anchor list.", "Appendix, page two: paint used."]))
    progress = read_file(page, pdf, "#ingest-add")
    assert any("page 2 / 2" in shown for shown in progress), progress
    expect(session_rows(page)).to_have_count(1)
    tokens_with_pdf = int(row.locator("td.num").first.inner_text().replace(",", ""))
    assert tokens_with_pdf > tokens

    page.fill("#max-tokens", "12")
    page.fill("#temperature", "1")
    answer = ask(page, "How many anchors were repainted?")
    assert answer.strip()
    chat = [r for r in api_calls if r.url.endswith("/v1/chat/completions")]
    assert len(chat) == 1
    body = chat[0].post_data_json
    session_id = row.get_attribute("data-id")
    assert (body["session_id"], body["stream"], body["max_tokens"], body.get("commit")) == (session_id, True, 12, None)
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in api_calls), "every call sends the key"

    page.check("#commit")
    assert ask(page, "And when?").strip()
    expect(row.locator("td.num").first).not_to_have_text(f"{tokens_with_pdf:,}")  # the exchange was kept

    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button.delete").click()
    expect(page.locator("#no-sessions")).to_be_visible()
    listed = httpx.get(f"{server_url}/v1/sessions", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert listed == []


def test_errors_are_shown_plainly(page: Page, tmp_path: Path, pdf_bytes) -> None:
    page.fill("#api-key", "not-the-key")
    page.press("#api-key", "Enter")
    expect(page.locator("#error-text")).to_have_text("a valid API key is required (Authorization: Bearer <key>)")
    page.fill("#api-key", OTHER_KEY)
    page.press("#api-key", "Enter")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#no-sessions")).to_be_visible()

    blank = tmp_path / "scan.pdf"
    blank.write_bytes(pdf_bytes([""]))
    page.set_input_files("#file", str(blank))
    page.click("#ingest-new")
    expect(page.locator("#error-text")).to_contain_text("no extractable text", timeout=TIMEOUT_MS)
    expect(page.locator("#progress-text")).to_have_text("Reading stopped.")
    expect(session_rows(page)).to_have_count(0)  # the session made for the failed read was deleted

    page.set_input_files("#file", {"name": "notes.docx", "mimeType": "application/octet-stream", "buffer": b"PK"})
    expect(page.locator("#error-text")).to_have_text("notes.docx: only .pdf, .txt and .md files can be read.")


def screenshot(out: Path, pdf_bytes: Callable[[list[str]], bytes]) -> None:
    """Serve the default model (as `fam-server` would), read a two-page PDF, ask a question, save the page."""
    with tempfile.TemporaryDirectory() as tmp, serve(create_app(Settings(data_dir=Path(tmp) / "data"))) as url:
        pdf = Path(tmp) / "bridge-report-2025.pdf"
        half = len(DOCUMENT) // 2
        pdf.write_bytes(pdf_bytes([DOCUMENT[:half], DOCUMENT[half:]]))
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 640})
            page.goto(url)
            read_file(page, pdf, "#ingest-new")
            page.fill("#max-tokens", "60")
            print(ask(page, "How many anchors were repainted, and when?"))
            page.screenshot(path=str(out))
    print(f"saved {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import _pdf_bytes

    screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/web.png"), _pdf_bytes)
