"""The web page at `/`, driven in headless Chromium (Debian's package) against the real server.

`i2v serve --model tiny` runs on loopback, once with a token and once with `--no-auth`; the page
uploads, submits, follows progress, plays and downloads the clip, keeps its history, and puts API
errors beside their fields. Screenshots go to test-artifacts/web/.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import probe


def _unavailable(reason: str) -> None:
    """Skip where the browser cannot be had; on CI (`CI` set) the browser tests must run, so fail."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required on CI)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    from playwright import sync_api
except ImportError:
    _unavailable("playwright is missing: pip install -e '.[dev]'")
expect = sync_api.expect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.access(CHROMIUM, os.X_OK):
    _unavailable("no chromium: ./setup.sh --dev installs Debian's package (as root with apt-get)")

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web"
TOKEN = "web-test-token"
CLIP_TIMEOUT_S = 300  # a tiny-model 5 s clip takes about half a minute on 2 busy cores
PROMPT = "a yellow sun drifts over a green field"


# ---------- the server and the browser ----------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(data_dir: Path, token: str | None, public_host: str | None = None) -> Iterator[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("I2V_API_TOKEN", "I2V_PUBLIC_URL")}
    if public_host:
        env["I2V_PUBLIC_URL"] = f"http://{public_host}:{port}"
    args = [sys.executable, "-m", "i2v", "serve", "--model", "tiny", "--data-dir", str(data_dir)]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    if token:
        env["I2V_API_TOKEN"] = token
    else:
        args.append("--no-auth")
    log_path = data_dir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"i2v serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"i2v serve did not answer in 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # The server names itself `localhost` while the browser opens 127.0.0.1: like a page opened on the
    # host itself when output URLs carry a proxy's public URL. The page must still reach its clips.
    yield from _start_server(tmp_path_factory.mktemp("web-auth"), TOKEN, public_host="localhost")


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _start_server(tmp_path_factory.mktemp("web-open"), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser profile (empty localStorage) per test; page errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"errors in the page's script: {errors}"


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def use_token(page: Any, base: str) -> None:
    page.goto(f"{base}/")
    page.fill("#token", TOKEN)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#auth-status")).to_contain_text("accepts your token")


def follow_job(page: Any, name: str) -> list[tuple[str, ...]]:
    """Watch the job panel until the clip plays or the prediction ends; returns what it showed
    as (state, queue, stage, steps, elapsed) tuples, and keeps a screenshot of it mid-way."""
    seen: list[tuple[str, ...]] = []
    deadline = time.monotonic() + CLIP_TIMEOUT_S
    while time.monotonic() < deadline:
        *shown, ready = page.evaluate(
            """() => [...['state', 'queue', 'stage', 'steps', 'elapsed'].map(
                         (id) => document.querySelector('#job-' + id).textContent),
                      document.querySelector('#result-video').readyState]"""
        )
        if not seen or seen[-1] != tuple(shown):
            seen.append(tuple(shown))
            if shown[0] == "Rendering" and not any(s[0] == "Rendering" for s in seen[:-1]):
                shot(page, f"{name}-rendering")
        if shown[0] in ("Done", "Failed", "Canceled") or ready >= 2:
            return seen
        time.sleep(0.15)
    pytest.fail(f"the clip did not finish in {CLIP_TIMEOUT_S} s; the page showed {seen[-5:]}")


def drop_file(page: Any, target: str, path: Path) -> None:
    """Drag a file from the desktop onto `target`: a drop event carrying it, as the browser sends one."""
    page.evaluate(
        """([target, name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, {type: 'image/png'}));
            const zone = document.querySelector(target);
            const init = {dataTransfer: data, bubbles: true, cancelable: true};
            for (const type of ['dragover', 'drop']) zone.dispatchEvent(new DragEvent(type, init));
        }""",
        [target, path.name, base64.b64encode(path.read_bytes()).decode()],
    )


def wait_until_playing(page: Any) -> dict[str, Any]:
    page.wait_for_function(
        "() => { const v = document.querySelector('#result-video'); return !v.paused && v.currentTime > 0; }",
        timeout=30_000,
    )
    return page.evaluate(
        """() => { const v = document.querySelector('#result-video');
                   return {src: v.currentSrc, duration: v.duration,
                           width: v.videoWidth, height: v.videoHeight}; }"""
    )


# ---------- tests ----------


def test_clip_with_token_plays_downloads_and_stays_in_history(
    page: Any, auth_server: str, image_file, tmp_path: Path
) -> None:
    page.goto(f"{auth_server}/")
    # The server needs a token: the page asks for it, refuses a wrong one, keeps the right one.
    expect(page.locator("#auth-status")).to_contain_text("needs an API token")
    expect(page.locator("#auth")).to_have_attribute("open", "")
    shot(page, "00-token-needed")
    page.fill("#token", "not-the-token")
    page.click("#token-form button[type=submit]")
    expect(page.locator("#token-error")).to_contain_text("did not accept")
    page.fill("#token", TOKEN)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#auth-status")).to_contain_text("accepts your token")
    assert page.evaluate("localStorage.getItem('i2v.token')") == TOKEN

    # The end image is for pro mode only.
    expect(page.locator("#end_image")).to_be_disabled()
    page.check("input[name=mode][value=pro]")
    expect(page.locator("#end_image")).to_be_enabled()
    page.check("input[name=mode][value=standard]")
    expect(page.locator("#end_image")).to_be_disabled()

    page.set_input_files("#start_image", str(image_file(640, 400, "JPEG")))
    expect(page.locator("#start_image-info")).to_contain_text("640 × 400 px")
    expect(page.locator("#start_image-preview")).to_be_visible()
    page.fill("#prompt", PROMPT)
    page.fill("#seed", "7")
    page.select_option("#preset", "fast")
    shot(page, "01-form")
    page.click("#submit")

    seen = follow_job(page, "auth")
    assert seen[-1][0] == "Done", seen
    # Live progress: the engine's stages from the logs, and the elapsed clock moving.
    stages = {stage.lower() for state, _, stage, *_ in seen if state == "Rendering"}
    assert stages & {"loading inputs", "loading model", "denoising", "decoding", "encoding video"}, seen
    assert len({elapsed for *_, elapsed in seen}) > 1, f"the elapsed time never moved: {seen}"
    for _, _, stage, steps, _ in seen:
        assert steps == "" or (stage == "Denoising" and steps.startswith("step ")), seen

    playing = wait_until_playing(page)
    assert playing["src"].startswith("blob:"), "with auth on, the clip is fetched with the token"
    assert playing["duration"] == pytest.approx(5.04, abs=0.1)
    assert playing["width"] > 0 and playing["height"] > 0
    expect(page.locator("#result-meta")).to_contain_text("seed 7")
    shot(page, "03-done")

    with page.expect_download() as download_info:
        page.click("#result-download")
    download = download_info.value
    assert download.suggested_filename.endswith(".mp4")
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    info = probe(saved)
    assert info["codec"] == "h264" and info["frames"] == 121
    assert (info["width"], info["height"]) == (playing["width"], playing["height"])

    history = page.locator("#history > li")
    expect(history).to_have_count(1)
    expect(history.first).to_contain_text(PROMPT)
    expect(history.first).to_contain_text("seed 7")
    expect(history.first.locator(".history-status")).to_have_text("Done")

    # After a reload the token and the history are still there; a clip re-runs from the history.
    page.reload()
    expect(page.locator("#auth-status")).to_contain_text("accepts your token")
    expect(history).to_have_count(1)
    history.first.locator("[data-action=rerun]").click()
    expect(history).to_have_count(2)
    expect(page.locator("#prompt")).to_have_value(PROMPT)
    expect(page.locator("#seed")).to_have_value("7")
    expect(page.locator("#preset")).to_have_value("fast")
    # A second re-run waits behind the first: the page shows its place in the queue.
    history.nth(1).locator("[data-action=rerun]").click()
    expect(history).to_have_count(3)
    expect(page.locator("#job-queue")).to_have_text("· 1 clip ahead of yours")
    api = httpx.Client(base_url=auth_server, headers={"Authorization": f"Bearer {TOKEN}"})
    ids = page.evaluate("JSON.parse(localStorage.getItem('i2v.history')).map((entry) => entry.id)")
    runs = [api.get(f"/v1/predictions/{id_}").json() for id_ in ids]  # newest first, as listed
    assert [run["input"] for run in runs[:3]] == [runs[2]["input"]] * 3  # re-runs send the same input
    assert runs[2]["input"]["seed"] == 7 and runs[2]["input"]["prompt"] == PROMPT
    assert runs[2]["input"]["preset"] == "fast"
    # Stop the running one through the API (it may be past its last cancel point and finish instead)
    # and cancel the queued one from the page: the history follows the server either way.
    running = api.post(f"/v1/predictions/{runs[1]['id']}/cancel").json()
    page.click("#job-cancel")
    expect(page.locator("#job-state")).to_have_text("Canceled", timeout=60_000)
    expect(history.first.locator(".history-status")).to_have_text("Canceled")
    deadline = time.monotonic() + CLIP_TIMEOUT_S
    while running["status"] not in ("succeeded", "failed", "canceled") and time.monotonic() < deadline:
        time.sleep(0.5)
        running = api.get(f"/v1/predictions/{runs[1]['id']}").json()
    label = {"succeeded": "Done", "canceled": "Canceled"}[running["status"]]
    expect(history.nth(1).locator(".history-status")).to_have_text(label, timeout=30_000)
    expect(history.nth(2).locator(".history-status")).to_have_text("Done")
    # The older clip still plays from the history.
    history.nth(2).locator("[data-action=play]").click()
    assert wait_until_playing(page)["duration"] == pytest.approx(5.04, abs=0.1)
    shot(page, "04-history")


def test_api_errors_show_beside_their_fields(page: Any, auth_server: str, image_file) -> None:
    use_token(page, auth_server)

    # No image yet: the page says so beside the image field.
    page.fill("#prompt", PROMPT)
    page.click("#submit")
    expect(page.locator("#start_image-error")).to_contain_text("Choose a start image")

    # A prompt over the limit: the server's 422 names input.prompt.
    page.set_input_files("#start_image", str(image_file(640, 400)))
    page.fill("#prompt", "x" * 2600)
    expect(page.locator("#prompt-count")).to_contain_text("2600 / 2500")
    page.click("#submit")
    expect(page.locator("#prompt-error")).to_contain_text("2500")
    expect(page.locator("#prompt")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#start_image-error")).to_be_empty()

    # An image under 300 px, dropped on the drop zone: the server names start_image.
    drop_file(page, "#start_image-drop", image_file(200, 150))
    expect(page.locator("#start_image-info")).to_contain_text("200 × 150 px")
    page.fill("#prompt", PROMPT)
    page.click("#submit")
    expect(page.locator("#prompt-error")).to_be_empty()
    expect(page.locator("#start_image-error")).to_contain_text("300", timeout=CLIP_TIMEOUT_S * 1000)
    expect(page.locator("#form-error")).to_be_empty()
    shot(page, "05-errors")


def test_clip_without_auth(page: Any, open_server: str, image_file) -> None:
    page.goto(f"{open_server}/")
    expect(page.locator("#auth-status")).to_contain_text("needs no token")
    expect(page.locator("#auth")).not_to_have_attribute("open", "")
    page.set_input_files("#start_image", str(image_file(480, 640)))
    page.fill("#prompt", PROMPT)
    page.click("#submit")
    seen = follow_job(page, "no-auth")
    assert seen[-1][0] == "Done", seen
    playing = wait_until_playing(page)
    # Without auth the player streams the output URL itself (Range requests).
    assert playing["src"].startswith(open_server)
    assert playing["height"] > playing["width"]  # the clip keeps the portrait image's shape
    expect(page.locator("#history > li")).to_have_count(1)
    shot(page, "06-no-auth")


def test_page_and_assets_are_open_while_the_api_needs_the_token(auth_server: str) -> None:
    with httpx.Client(base_url=auth_server) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert 'src="web/app.js"' in page.text  # relative: the page also works under a proxy's path prefix
        assert client.get("/web/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/web/style.css").headers["content-type"].startswith("text/css")
        for path in ("/web/index.py", "/web/..%2Fserver%2Fapp.py", "/web/"):
            assert client.get(path).status_code == 404, path
        assert client.get("/v1/predictions").status_code == 401
