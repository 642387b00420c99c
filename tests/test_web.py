"""The web page at `/`, driven in headless Chromium (Debian's package) against real `i2v serve` processes.

Three servers on loopback: the tiny model with a token (the clips whose frames are compared: the page's
and the ones its API snippets make with curl, the official Python client and the official JS client), the
fault-injection backend with a token (black frames at once, or a run that lasts until canceled, or a failure:
every other state of the page), and the fault backend with `--no-auth`. Each state is checked for sideways
scrolling at 390 and 1280 px, light and dark, screenshotted into test-artifacts/web/, and five of them go
through axe-core (tests/web-tools, installed by ./setup.sh --dev).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import decode_frames, probe
from hardening import FAULT_ENV, NO_LIMITS
from serverproc import PREDICTIONS, free_port

from i2v.server.states import TERMINAL


def _unavailable(reason: str, module: bool = True) -> None:
    """Skip where a tool cannot be had; on CI (`CI` set) the browser tests must run, so fail."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required on CI)", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


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
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "web"
WEB_TOOLS = ROOT / "tests" / "web-tools" / "node_modules"
AXE = WEB_TOOLS / "axe-core" / "axe.min.js"
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]
TOKEN = "web-test-token"
CLIP_TIMEOUT_S = 300  # a tiny-model 5 s clip takes 5 to 30 s on 2 cores, depending on what else runs
PROMPT = "a yellow sun drifts over a green field"
LONG_RUN = "fault:slow:3000"  # a fault-backend run of 10 minutes at most: it ends when the test cancels it
WIDTHS = (1280, 390)


# ---------- the servers and the browser ----------


def _start_server(
    data_dir: Path,
    token: str | None,
    *,
    model: str = "tiny",
    public_host: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if k not in ("I2V_API_TOKEN", "I2V_PUBLIC_URL")}
    full_env.update({**NO_LIMITS, **(env or {})})
    if public_host:
        full_env["I2V_PUBLIC_URL"] = f"http://{public_host}:{port}"
    args = [sys.executable, "-m", "i2v", "serve", "--model", model, "--data-dir", str(data_dir)]
    args += ["--host", "127.0.0.1", "--port", str(port)]
    if token:
        full_env["I2V_API_TOKEN"] = token
    else:
        args.append("--no-auth")
    log_path = data_dir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"i2v serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health-check", timeout=2).json()["status"] in ("READY", "BUSY"):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"i2v serve was not ready in 120 s:\n{log_path.read_text()[-3000:]}")
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
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # The server names itself `localhost` while the browser opens 127.0.0.1: like a page opened on the
    # host itself when output URLs carry a proxy's public URL. The page must still reach its clips.
    yield from _start_server(tmp_path_factory.mktemp("web-tiny"), TOKEN, public_host="localhost")


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Output URLs behind the token (I2V_OUTPUT_URLS=token): the page fetches those with it, whole.
    yield from _start_server(
        tmp_path_factory.mktemp("web-fault"),
        TOKEN,
        model="fault-injection",
        env={**FAULT_ENV, "I2V_OUTPUT_URLS": "token"},
    )


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _start_server(
        tmp_path_factory.mktemp("web-open"), None, model="fault-injection", env=FAULT_ENV
    )


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
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    if AXE.is_file():
        # An init script is not subject to the page's CSP (an injected <script> would be refused).
        context.add_init_script(path=str(AXE))
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"errors in the page's script: {errors}"


def api(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=90)


def wait_for(base: str, prediction_id: str, statuses: Collection[str] = TERMINAL):
    deadline = time.monotonic() + CLIP_TIMEOUT_S
    with api(base) as client:
        while time.monotonic() < deadline:
            body = client.get(f"/v1/predictions/{prediction_id}").json()
            if body["status"] in statuses:
                return body
            time.sleep(0.3)
    pytest.fail(f"{prediction_id} still {body['status']} after {CLIP_TIMEOUT_S} s")


# ---------- what every state is checked for ----------

OVERFLOW = """() => {
    const width = document.documentElement.clientWidth;
    const wide = [];
    for (const el of document.querySelectorAll('body *')) {
        const box = el.getBoundingClientRect();
        if (!box.width || !el.checkVisibility({visibilityProperty: true})) continue;  // a closed <details>
        let clipped = false;  // inside a box that scrolls or clips (a code block): not the page's width
        for (let up = el.parentElement; up && up !== document.body; up = up.parentElement) {
            const style = getComputedStyle(up);
            if (style.overflowX !== 'visible' && up.getBoundingClientRect().right <= width + 1) {
                clipped = true;
                break;
            }
        }
        if (box.width > width + 1 || (!clipped && box.right > width + 1)) {
            wide.push(`${el.tagName.toLowerCase()}#${el.id}.${el.className} ${Math.round(box.width)} px`);
        }
    }
    return {scroll: document.documentElement.scrollWidth, inner: innerWidth, wide: wide.slice(0, 5)};
}"""


def check_layout(page: Any) -> None:
    """No sideways scrolling: the page is no wider than the window and no element is wider either."""
    layout = page.evaluate(OVERFLOW)
    assert layout["scroll"] <= layout["inner"] and not layout["wide"], layout


def shots(page: Any, name: str) -> None:
    """The state at 1280 and 390 px, light and dark: checked for sideways scrolling and kept as PNGs."""
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 1000})
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)
            check_layout(page)
            page.screenshot(path=str(ARTIFACTS / f"{name}-{width}-{scheme}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 1000})
    page.emulate_media(color_scheme="light")


def axe(page: Any, state: str) -> None:
    """axe-core on the page as it is, light and dark: no WCAG 2.x A/AA violation."""
    if not AXE.is_file():
        _unavailable("axe-core is missing: ./setup.sh --dev installs it (npm ci in tests/web-tools)", False)
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        result = page.evaluate(
            "async (tags) => { const r = await axe.run(document, {runOnly: {type: 'tag', values: tags}});"
            " return r.violations.map((v) => ({id: v.id, help: v.help,"
            " nodes: v.nodes.slice(0, 3).map((n) => n.target.join(' ') + ': ' + n.failureSummary)})); }",
            AXE_TAGS,
        )
        assert result == [], f"axe, {state} ({scheme}): {json.dumps(result, indent=1)}"
    page.emulate_media(color_scheme="light")


RECORDER = """() => {
    // Every change of the clip panel, as the user saw it: state, stage text, bar value, times line.
    window.__seen = [];
    const read = () => {
        const bar = document.querySelector('#clip-progress');
        const row = {
            id: document.querySelector('#clip').dataset.id,
            state: document.querySelector('#clip-state').textContent,
            stage: document.querySelector('#clip-stage').textContent
                + document.querySelector('#clip-steps').textContent,
            value: bar.hidden || !bar.hasAttribute('value') ? null : bar.value,
            times: document.querySelector('#clip-times').textContent,
            video: !document.querySelector('#clip-output').hidden,
        };
        const last = window.__seen.at(-1);
        if (!last || JSON.stringify(last) !== JSON.stringify(row)) window.__seen.push(row);
    };
    new MutationObserver(read).observe(document.querySelector('#clip'),
        {subtree: true, childList: true, characterData: true, attributes: true});
    read();
}"""


def use_token(page: Any, base: str, query: str = "") -> None:
    page.goto(f"{base}/{query}")
    page.fill("#token", TOKEN)
    page.click("#token-save")
    expect(page.locator("#auth-status")).to_contain_text("accepts your token")


def new_clip(page: Any, image: Path, prompt: str, **fields: str) -> None:
    page.set_input_files("#start_image", str(image))
    expect(page.locator("#start_image-info")).to_contain_text(" px")
    page.fill("#prompt", prompt)
    for name, value in fields.items():
        page.fill(f"#{name}", value)
    page.click("#submit")
    expect(page.locator("#clip")).to_be_visible()
    expect(page.locator("#clip-title")).to_have_text(
        prompt[:139] + ("…" if len(prompt) > 140 else prompt[139:])
    )


def clip_id(page: Any) -> str:
    return page.locator("#clip").get_attribute("data-id")


def wait_until_playing(page: Any) -> dict[str, Any]:
    page.wait_for_function(
        "() => { const v = document.querySelector('#clip-video'); return !v.paused && v.currentTime > 0; }",
        timeout=60_000,
    )
    return page.evaluate(
        """() => { const v = document.querySelector('#clip-video');
                   return {src: v.currentSrc, duration: v.duration, width: v.videoWidth, height: v.videoHeight}; }"""
    )


def dispatch_paste(page: Any, target: str, *, path: Path | None = None, text: str | None = None) -> None:
    """A paste event carrying a file or text, as the browser sends one for Ctrl+V."""
    page.evaluate(
        """([target, name, b64, text]) => {
            const data = new DataTransfer();
            if (b64) {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                data.items.add(new File([bytes], name, {type: 'image/png'}));
            }
            if (text) data.setData('text/plain', text);
            document.querySelector(target).dispatchEvent(
                new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true}));
        }""",
        [
            target,
            path.name if path else "",
            base64.b64encode(path.read_bytes()).decode() if path else "",
            text or "",
        ],
    )


def drop_file(page: Any, target: str, path: Path, mime: str = "image/png") -> None:
    """Drag a file from the desktop onto `target`: a drop event carrying it, as the browser sends one."""
    page.evaluate(
        """([target, name, b64, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, {type: mime}));
            const zone = document.querySelector(target);
            const init = {dataTransfer: data, bubbles: true, cancelable: true};
            for (const type of ['dragover', 'drop']) zone.dispatchEvent(new DragEvent(type, init));
        }""",
        [target, path.name, base64.b64encode(path.read_bytes()).decode(), mime],
    )


def history_item(page: Any, prediction_id: str) -> Any:
    return page.locator(f"#history > li[data-id='{prediction_id}']")


# ---------- the tiny model: a real clip, and the same clip from each API snippet ----------


def test_clip_plays_and_its_api_snippets_make_the_same_clip(
    page: Any, tiny_server: str, image_file, tmp_path: Path
) -> None:
    use_token(page, tiny_server)
    page.set_input_files("#start_image", str(image_file(640, 400, "JPEG")))
    expect(page.locator("#start_image-info")).to_contain_text("640 × 400 px")
    # The size the server will make, before anything is sent (short side 720, long side from the aspect).
    expect(page.locator("#output-size")).to_have_text("Output: 1152 × 720 · 5 s · 24 fps")
    page.fill("#prompt", PROMPT)  # no seed: the server picks one, and the snippets fill it in
    page.evaluate(RECORDER)
    fetched: list[dict[str, str]] = []  # the player's requests for the clip
    page.on("request", lambda r: "/outputs/" in r.url and fetched.append({"url": r.url, **r.all_headers()}))
    page.click("#submit")
    expect(page.locator("#clip-title")).to_be_focused()  # focus follows the new clip, not the page body
    expect(page.locator("#clip-state")).to_have_text("Done", timeout=CLIP_TIMEOUT_S * 1000)
    playing = wait_until_playing(page)
    # The player streams the signed link itself (byte ranges, no token, nothing fetched whole first), at
    # the page's own origin though the server names itself localhost.
    assert playing["src"].startswith(f"{tiny_server}/outputs/") and "signature=" in playing["src"]
    assert fetched and all("range" in r and "authorization" not in r for r in fetched), fetched
    assert playing["duration"] == pytest.approx(5.04, abs=0.1)
    assert (playing["width"], playing["height"]) == (1152, 720)

    # One bar over all stages: a value in every stage of the run, never going back, full only when done.
    seen = page.evaluate("window.__seen")
    running = [row for row in seen if row["state"] == "Rendering"]
    assert running and all(row["value"] is not None for row in running), seen
    values = [row["value"] for row in running]
    assert values == sorted(values) and values[-1] < 1, values
    stages = {row["stage"].split(",")[0] for row in running}
    assert len(stages) >= 2 and stages <= {
        "Starting",  # claimed, before the worker's first line
        "Loading inputs",
        "Loading model",
        "Denoising",
        "Decoding",
        "Encoding video",
    }, stages
    assert all("elapsed" in row["times"] for row in running), running
    assert any("first clip of this kind" in row["times"] for row in running)  # no history yet: no promise
    assert not any(row["video"] for row in running), "no player before this clip is done"

    with api(tiny_server) as client:
        pred = client.get(f"/v1/predictions/{clip_id(page)}").json()
    seed = pred["logs"].split("seed: ")[-1].strip()
    assert "seed" not in pred["input"] and seed.isdigit()
    # The real output URL and the seed, each with a copy button; the seed can go back into the form.
    expect(page.locator("#clip-url")).to_have_text(pred["output"])
    expect(page.locator("#clip-seed")).to_have_text(seed)
    page.click("button[data-copy=clip-url]")
    expect(page.locator("button[data-copy=clip-url]")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == pred["output"]
    page.click("button[data-copy=clip-seed]")
    expect(page.locator("button[data-copy=clip-seed]")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == seed
    page.click("#clip-reuse-seed")
    expect(page.locator("#seed")).to_have_value(seed)
    expect(page.locator("#seed")).to_be_focused()
    # The heading's thumbnail is the clip's poster frame, fetched with the token; so is the history's.
    thumb = page.locator("#clip-thumb")
    expect(thumb).to_be_visible()
    page.wait_for_function(
        "() => { const img = document.querySelector('#clip-thumb');"
        " return img.src.startsWith('blob:') && img.complete && img.naturalWidth > 0; }"
    )
    entry = history_item(page, pred["id"])
    expect(entry.locator(".history-status")).to_have_text("Done")
    expect(entry.locator("img.thumb.poster")).to_be_visible()
    assert entry.locator("img.thumb").get_attribute("src").startswith("blob:")
    assert entry.locator("[data-action=cancel]").is_hidden()

    with page.expect_download() as download_info:
        page.click("#clip-download")
    saved = tmp_path / download_info.value.suggested_filename
    download_info.value.save_as(saved)
    info = probe(saved)
    assert (
        info["codec"] == "h264" and info["frames"] == 121 and (info["width"], info["height"]) == (1152, 720)
    )

    page.click("#clip-logs summary")
    page.click("#clip-api summary")
    # The prediction's JSON opens in a tab of its own, without the token (it is the JSON the page fetched).
    with page.context.expect_page() as tab:
        page.click("#clip-json-link")
    tab.value.wait_for_load_state()
    assert json.loads(tab.value.locator("body").inner_text())["id"] == clip_id(page)
    tab.value.close()
    expect(page.locator("#clip-logs-text")).to_contain_text(f"seed: {seed}")
    expect(page.locator("#snippet-note")).to_contain_text(f"Seed {seed} is filled in")
    shots(page, "10-done")
    axe(page, "a finished clip with its logs and API view open")

    # The API view's snippets, run as printed, make the same clip: same frames as the page's.
    snippets = {lang: page.locator(f"#snippet-{lang}").text_content() for lang in ("curl", "python", "js")}
    for lang in ("python", "js"):  # the tabs switch what is shown
        page.click(f"#tab-{lang}")
        expect(page.locator(f"#panel-{lang}")).to_be_visible()
        expect(page.locator("#panel-curl")).to_be_hidden()
    assert f'"seed": {seed}' in snippets["curl"] and f"seed: {seed}," in snippets["js"]
    env = {**os.environ, "REPLICATE_API_TOKEN": TOKEN}
    reference = decode_frames(saved)
    assert reference.std() > 5, "a clip with content: a clip of another seed would differ"

    curl = subprocess.run(
        ["bash", "-c", snippets["curl"]], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    created = json.loads(curl.stdout)
    done = wait_for(tiny_server, created["id"])
    assert done["status"] == "succeeded", done
    with api(tiny_server) as client:
        (tmp_path / "curl.mp4").write_bytes(
            client.get(done["output"].replace("localhost", "127.0.0.1")).content
        )
    assert np.array_equal(decode_frames(tmp_path / "curl.mp4"), reference)

    python_dir = tmp_path / "python"
    python_dir.mkdir()
    subprocess.run(
        [sys.executable, "-c", snippets["python"]],
        cwd=python_dir,
        env=env,
        timeout=CLIP_TIMEOUT_S,
        check=True,
    )
    assert np.array_equal(decode_frames(python_dir / "output.mp4"), reference)

    if not (WEB_TOOLS / "replicate").is_dir() or not shutil.which("node"):
        _unavailable("node or the JS client is missing: ./setup.sh --dev installs them", False)
    js_dir = tmp_path / "js"
    js_dir.mkdir()
    (js_dir / "node_modules").symlink_to(WEB_TOOLS)
    (js_dir / "snippet.mjs").write_text(snippets["js"])
    subprocess.run(["node", "snippet.mjs"], cwd=js_dir, env=env, timeout=CLIP_TIMEOUT_S, check=True)
    assert np.array_equal(decode_frames(js_dir / "output.mp4"), reference)

    # urls.web links to this page showing that prediction; with history now, the usual time is known.
    assert pred["urls"]["web"] == f"{pred['urls']['get'].split('/v1/')[0]}/?prediction={pred['id']}"
    page.goto(f"{tiny_server}/?prediction={pred['id']}")
    expect(page.locator("#clip")).to_have_attribute("data-id", pred["id"])
    expect(page.locator("#clip-state")).to_have_text("Done")
    expect(page.locator("#clip-times")).to_contain_text("usually about")
    expect(page.locator("#estimate-hint")).to_contain_text("Usually about")
    wait_until_playing(page)


# ---------- the fault backend: every other state ----------


def test_the_stage_is_the_last_progress_line_whatever_is_logged_after_it(
    page: Any, fault_server: str
) -> None:
    """The engine's own lines (what runs, the file written) come between and after the progress lines; the
    stage shown stays the last progress line's (CI once showed "Wrote ….mp4" as the stage)."""
    from i2v.progress import STAGES, format_stage_times
    from i2v.server.worker import progress_line

    page.goto(f"{fault_server}/")
    parse = "async (logs) => (await import('./web/progress.js')).parseLogs(logs)"
    assert page.evaluate("async () => (await import('./web/progress.js')).STAGES") == list(STAGES)
    lines = [
        "running tiny-wan2.2-ti2v-5b on cpu (one device); negative prompt: the model's default",
        progress_line("loading inputs", None, None),
    ]
    assert page.evaluate(parse, "\n".join(lines[:1])) == {
        "stage": "",
        "step": None,
        "total": None,
        "seed": None,
    }
    lines += [progress_line("denoising", 2, 5), "moved the text encoder to the CPU"]
    assert page.evaluate(parse, "\n".join(lines)) == {
        "stage": "denoising",
        "step": 2,
        "total": 5,
        "seed": None,
    }
    lines += [
        progress_line("encoding video", None, None),
        "wrote abc.mp4 (tiny-wan2.2-ti2v-5b, seed 7) in 1 s",
    ]
    assert page.evaluate(parse, "\n".join(lines))["stage"] == "encoding video"
    lines += [format_stage_times({"denoising": 1.0}), "seed: 7"]
    assert page.evaluate(parse, "\n".join(lines)) == {
        "stage": "encoding video", "step": None, "total": None, "seed": "7"
    }  # fmt: skip


def test_token_is_checked_before_it_is_kept(page: Any, fault_server: str, image_file) -> None:
    page.goto(f"{fault_server}/")
    expect(page.locator("#auth-status")).to_contain_text("needs an API token")
    expect(page.locator("#auth")).to_have_attribute("open", "")
    shots(page, "01-token-needed")
    axe(page, "the token needed")
    # Without a token the server says so, above the form.
    page.set_input_files("#start_image", str(image_file(640, 400)))
    page.fill("#prompt", PROMPT)
    page.click("#submit")
    expect(page.locator("#form-error")).to_contain_text("needs a valid API token")
    # A rejected token is not kept; the right one is, and the old errors go.
    page.fill("#token", "not-the-token")
    page.click("#token-save")
    expect(page.locator("#token-error")).to_contain_text("did not accept this token, so it was not saved")
    expect(page.locator("#token")).to_be_focused()
    assert page.evaluate("localStorage.getItem('i2v.token')") is None
    page.fill("#token", TOKEN)
    page.locator("#token").press("Enter")
    expect(page.locator("#auth-status")).to_contain_text("accepts your token")
    assert page.evaluate("localStorage.getItem('i2v.token')") == TOKEN
    expect(page.locator("#token-error")).to_be_empty()
    expect(page.locator("#form-error")).to_be_empty()
    expect(page.locator("#auth")).not_to_have_attribute("open", "")
    expect(page.locator("#auth-summary")).to_be_focused()  # not the page body
    expect(page.locator("#auth-summary")).to_have_text("API token saved")
    # A wrong token typed over a good one leaves the good one saved.
    page.click("#auth-summary")
    page.fill("#token", "wrong-again")
    page.click("#token-save")
    expect(page.locator("#token-error")).to_contain_text("not saved")
    assert page.evaluate("localStorage.getItem('i2v.token')") == TOKEN
    page.reload()
    expect(page.locator("#auth-status")).to_contain_text("accepts your token")


def test_the_result_is_the_clip_it_names_and_cancel_works_anywhere(
    page: Any, fault_server: str, image_file
) -> None:
    use_token(page, fault_server)
    image = image_file(640, 400)
    new_clip(page, image, "clip A, black frames at once")
    expect(page.locator("#clip-state")).to_have_text("Done", timeout=60_000)
    first = clip_id(page)
    assert wait_until_playing(page)["src"].startswith("blob:")  # behind the token: fetched with it

    # Clip B starts: the panel is B's at once (its prompt and id), with no player of A left.
    page.evaluate(RECORDER)
    # First as a poll can catch it between the claim and the worker's first line (the server's own answer,
    # its logs held back): "Starting", and the bar at 0 rather than blank.
    route = "**/v1/predictions/*"

    def before_first_line(r: Any) -> None:
        answer = r.fetch()
        body = answer.json()
        if body.get("status") == "processing":
            body["logs"] = ""
        r.fulfill(response=answer, json=body)

    page.route(route, before_first_line)
    new_clip(page, image, f"clip B {LONG_RUN}")
    second = clip_id(page)
    assert second != first
    expect(page.locator("#clip-link")).to_have_text(second)
    expect(page.locator("#clip-output")).to_be_hidden()
    expect(page.locator("#clip-state")).to_have_text("Rendering")
    expect(page.locator("#clip-stage")).to_have_text("Starting")
    expect(page.locator("#clip-progress")).to_have_attribute("value", "0")
    page.unroute(route, before_first_line)
    expect(page.locator("#clip-stage")).to_have_text("Denoising")
    expect(page.locator("#clip-steps")).to_contain_text(", step ")
    # The bar covers all stages with the shares this server measured; the time comes from clip A.
    with api(fault_server) as client:
        estimate = client.get("/v1/i2v/estimate", params={"mode": "standard", "duration": "5"}).json()
    assert estimate["basis"] == "same inputs" and estimate["count"] >= 1
    names = [s["name"] for s in estimate["stages"]]
    assert names[:2] == ["loading inputs", "loading model"] and "encoding video" in names
    expect(page.locator("#clip-times")).to_contain_text(re.compile(r"left · usually about \d+ s here$"))
    shown = page.evaluate(
        "() => [document.querySelector('#clip-steps').textContent, document.querySelector('#clip-progress').value]"
    )
    step, total = (int(n) for n in shown[0].split("step ")[1].split(" of "))
    shares = {s["name"]: s["share"] for s in estimate["stages"]}
    before = shares["loading inputs"] + shares["loading model"]
    expected = (before + shares["denoising"] * step / total) / sum(shares.values())
    assert shown[1] >= expected - 0.02, (shown, estimate)  # never behind the stage it is in
    shots(page, "11-rendering")
    axe(page, "a clip rendering")

    page.click("#clip-cancel")
    expect(page.locator("#clip-state")).to_have_text("Canceled", timeout=30_000)
    expect(page.locator("#clip-stage")).to_be_empty()  # not "Canceled / Denoising"
    expect(page.locator("#clip-steps")).to_be_empty()
    expect(page.locator("#clip-title")).to_be_focused()  # Cancel is gone: focus stays in the panel
    expect(page.locator("#clip-link")).to_have_text(second)
    expect(page.locator("#clip-output")).to_be_hidden()
    expect(page.locator("#clip-progress")).to_be_hidden()
    seen = page.evaluate("window.__seen")
    assert not any(row["video"] for row in seen if row["id"] == second), "A's player never showed for B"
    expect(history_item(page, second).locator(".history-status")).to_have_text("Canceled")
    shots(page, "12-canceled")

    # The history is the server's list: cancel works on any queued or running clip from there.
    with api(fault_server) as client:
        body = {"input": {"prompt": f"clip C {LONG_RUN}", "start_image": "data:image/png;base64,"}}
        body["input"]["start_image"] += base64.b64encode(image.read_bytes()).decode()
        running = client.post(PREDICTIONS, json=body).json()
        wait_for(fault_server, running["id"], ("processing",))
    new_clip(page, image, "clip D waits behind C")
    queued = clip_id(page)
    expect(page.locator("#clip-state")).to_have_text("Queued")
    expect(page.locator("#clip-stage")).to_have_text("1 clip ahead of yours")
    expect(history_item(page, running["id"]).locator(".history-status")).to_have_text("Rendering")
    history_item(page, queued).locator("[data-action=cancel]").click()
    expect(history_item(page, queued).locator(".history-status")).to_have_text("Canceled")
    expect(page.locator("#clip-state")).to_have_text("Canceled")
    history_item(page, running["id"]).locator("[data-action=cancel]").click()
    expect(history_item(page, running["id"]).locator(".history-status")).to_have_text(
        "Canceled", timeout=30_000
    )
    assert wait_for(fault_server, running["id"])["status"] == "canceled"

    # Open A again from the history: its clip, its seed; Edit inputs and Re-run keep that seed.
    history_item(page, first).locator("[data-action=open]").click()
    expect(page.locator("#clip-link")).to_have_text(first)
    expect(page.locator("#clip-title")).to_be_focused()
    wait_until_playing(page)
    seed = page.locator("#clip-seed").text_content()
    assert seed.isdigit()
    history_item(page, first).locator("[data-action=edit]").click()
    expect(page.locator("#seed")).to_have_value(seed)
    expect(page.locator("#prompt")).to_have_value("clip A, black frames at once")
    expect(page.locator("#prompt")).to_be_focused()
    history_item(page, first).locator("[data-action=rerun]").click()
    expect(page.locator("#clip-link")).not_to_have_text(first)
    rerun = clip_id(page)
    with api(fault_server) as client:
        again, original = (client.get(f"/v1/predictions/{i}").json()["input"] for i in (rerun, first))
    assert again["seed"] == int(seed) and again["start_image"] == original["start_image"]
    assert again["prompt"] == original["prompt"]
    expect(page.locator("#clip-state")).to_have_text("Done", timeout=60_000)


def test_errors_show_early_in_plain_words(page: Any, fault_server: str, image_file, tmp_path: Path) -> None:
    use_token(page, fault_server)
    created: list[str] = []
    page.on("request", lambda r: created.append(r.url) if r.method == "POST" else None)

    # An empty prompt is not sent.
    page.set_input_files("#start_image", str(image_file(640, 400)))
    expect(page.locator("#start_image-info")).to_contain_text("640 × 400 px")
    page.click("#submit")
    expect(page.locator("#prompt-error")).to_have_text("Write a prompt: what should happen in the clip?")
    expect(page.locator("#prompt")).to_be_focused()
    page.fill("#prompt", "   ")
    page.locator("#prompt").press("Control+Enter")
    expect(page.locator("#prompt-error")).to_contain_text("Write a prompt")
    assert created == [], "nothing is uploaded or created for an empty prompt"

    # Known as soon as they are true: a small image, a text file named .png, an over-long prompt.
    page.set_input_files("#start_image", str(image_file(200, 150)))
    expect(page.locator("#start_image-error")).to_have_text(
        "This image is 200 × 150 px; each side must be at least 300 px. Choose a larger image."
    )
    fake = tmp_path / "notes.png"
    fake.write_text("these are my notes, not a picture")
    drop_file(page, "#start_image-drop", fake)
    expect(page.locator("#start_image-error")).to_contain_text("“notes.png” is not a JPEG, PNG or WebP image")
    expect(page.locator("#start_image-preview")).to_be_hidden()
    page.fill("#prompt", "x" * 2500)
    page.locator("#prompt").press("End")
    page.keyboard.type("yz")  # typed past the limit: the message follows each key
    expect(page.locator("#prompt-count")).to_have_text("2502 / 2500 characters")
    expect(page.locator("#prompt-error")).to_have_text(
        "The prompt is 2502 characters long; at most 2500 are allowed. Shorten it by 2."
    )
    page.fill("#seed", "9223372036854775808")
    expect(page.locator("#seed-error")).to_have_text(
        "The seed must be a whole number from 0 to 9223372036854775807, or left blank for a random one."
    )
    # Every problem at once, the image's too (not only once the prompt is fixed); still nothing sent.
    page.set_input_files("#start_image", str(image_file(100, 400)))
    page.click("#submit")
    for field in ("start_image", "prompt", "seed"):
        expect(page.locator(f"#{field}-error")).not_to_be_empty()
    expect(page.locator("#start_image-error")).to_contain_text("100 × 400 px")
    assert created == []
    shots(page, "13-errors")
    axe(page, "errors beside their fields")

    # The server's own rule text never reaches the user: its 422 for that seed, as the page words it.
    with api(fault_server) as client:
        answer = client.post(
            PREDICTIONS,
            json={"input": {"prompt": "x", "start_image": "data:,", "seed": 2**63}},
        ).json()
    (item,) = [f for f in answer["invalid_fields"] if f["field"] == "input.seed"]
    assert "Input should be" in item["description"]
    worded = page.evaluate(
        "async ([type, text]) => (await import('./web/rules.js')).plainError('seed', type, text)",
        [item["type"], item["description"]],
    )
    assert (
        worded
        == "The seed must be a whole number from 0 to 9223372036854775807, or left blank for a random one."
    )

    # With the server down, the page says so above the form, not beside a field.
    page.set_input_files("#start_image", str(image_file(640, 400)))
    page.fill("#prompt", PROMPT)
    page.fill("#seed", "")
    page.route("**/v1/**", lambda route: route.abort("connectionrefused"))
    page.click("#submit")
    banner = page.locator("#server-status")
    expect(banner).to_contain_text("The server did not answer")
    assert (
        banner.bounding_box()["y"] + banner.bounding_box()["height"]
        <= page.locator("#clip-form").bounding_box()["y"]
    )
    for field in ("start_image", "prompt", "form"):
        expect(page.locator(f"#{field}-error")).to_be_empty()
    shots(page, "14-server-down")
    page.unroute("**/v1/**")
    page.click("#submit")
    expect(page.locator("#clip-state")).to_have_text("Done", timeout=60_000)
    expect(banner).to_be_hidden()
    made = clip_id(page)

    # When the server's list cannot be read, the history kept in this browser stands in.
    expect(page.locator("#history-source")).to_have_text("This token's clips on the server, newest first.")
    page.route("**/v1/predictions", lambda route: route.fulfill(status=404, body="{}"))
    page.reload()
    expect(page.locator("#history-source")).to_contain_text(
        "Kept in this browser (the server's list could not be read"
    )
    expect(history_item(page, made).locator(".history-status")).to_have_text("Done")
    expect(page.locator("#history > li")).to_have_count(1)  # only what this browser made
    expect(history_item(page, made).locator("[data-action=remove]")).to_be_visible()


def test_a_failed_clip_shows_its_logs_and_long_prompts_never_widen_the_page(
    page: Any, fault_server: str, image_file
) -> None:
    use_token(page, fault_server)
    image = image_file(480, 640)
    new_clip(page, image, "fault:oom " + "y" * 2490)  # 2,500 characters with no space to break at
    expect(page.locator("#clip-state")).to_have_text("Failed", timeout=60_000)
    expect(page.locator("#clip-error")).to_contain_text("This clip failed")
    expect(page.locator("#clip-error")).to_contain_text("out of GPU memory")
    expect(page.locator("#clip-logs")).to_have_attribute("open", "")
    expect(page.locator("#clip-logs-text")).to_contain_text("denoising")
    failed = clip_id(page)
    expect(history_item(page, failed).locator(".history-status")).to_contain_text("Failed")
    # A phone-width prompt of 48 characters without spaces, and the 2,500-character one above.
    new_clip(page, image, "x" * 48)
    expect(page.locator("#clip-state")).to_have_text("Done", timeout=60_000)
    history_item(page, failed).locator("[data-action=open]").click()
    expect(page.locator("#clip-state")).to_have_text("Failed")
    expect(page.locator("#clip-logs")).to_have_attribute("open", "")
    shots(page, "15-failed")
    axe(page, "a failed clip with its logs, and the history")


def test_form_conveniences(page: Any, fault_server: str, image_file, http_dir) -> None:
    use_token(page, fault_server)
    # The output size follows the image and the mode, computed as the server does (geometry.output_size).
    from i2v.geometry import output_size

    sizes = [(640, 400), (1281, 720), (300, 301), (719, 1080), (1000, 2500), (2500, 1000), (301, 300)]
    sizes += [(w, h) for w in range(300, 2000, 97) for h in range(300, 1900, 131)]
    for short in (720, 1080):
        ours = page.evaluate(
            "async ([sizes, short]) => { const m = await import('./web/rules.js');"
            " return sizes.map(([w, h]) => m.outputSize(w, h, short)); }",
            [sizes, short],
        )
        assert [tuple(s) for s in ours] == [output_size(w, h, short) for w, h in sizes]
    # The whole drop zone opens the picker, not only its button.
    with page.expect_file_chooser() as chooser:
        page.click("#start_image-drop .drop-text p:first-child")
    chooser.value.set_files(str(image_file(1281, 720)))
    expect(page.locator("#output-size")).to_have_text("Output: 1280 × 720 · 5 s · 24 fps")
    page.check("input[name=mode][value=pro]")
    page.check("input[name=duration][value='10']")
    expect(page.locator("#output-size")).to_have_text("Output: 1922 × 1080 · 10 s · 24 fps")

    # An end image chosen in Pro is removed, visibly, when switching to Standard.
    page.set_input_files("#end_image", str(image_file(640, 360, seed=2)))
    expect(page.locator("#end_image-preview")).to_be_visible()
    page.check("input[name=mode][value=standard]")
    expect(page.locator("#end_image-preview")).to_be_hidden()
    expect(page.locator("#end_image-info")).to_be_empty()
    expect(page.locator("#end_image-note")).to_have_text(
        "Standard mode takes no end image, so the one you chose was removed."
    )
    expect(page.locator("#end_image")).to_be_disabled()
    page.check("input[name=mode][value=pro]")
    expect(page.locator("#end_image-preview")).to_be_hidden()  # gone, not hidden away
    expect(page.locator("#end_image-note")).to_be_empty()
    page.check("input[name=mode][value=standard]")

    # Paste an image, then an image URL (the server fetches that itself); Ctrl+Enter submits.
    dispatch_paste(page, "body", path=image_file(500, 500, seed=3))
    expect(page.locator("#start_image-info")).to_contain_text("500 × 500 px")
    expect(page.locator("#output-size")).to_have_text("Output: 720 × 720 · 10 s · 24 fps")
    folder, url = http_dir
    (folder / "web.png").write_bytes(image_file(640, 480, seed=4).read_bytes())
    dispatch_paste(page, "#prompt", text=f"{url}/web.png")  # into the prompt: text, as typed
    expect(page.locator("#start_image-info")).to_contain_text("500 × 500 px")
    dispatch_paste(page, "body", text=f"{url}/web.png")
    expect(page.locator("#start_image-info")).to_contain_text("640 × 480 px")
    expect(page.locator("#output-size")).to_have_text("Output: 960 × 720 · 10 s · 24 fps")
    page.fill("#prompt", "from a pasted URL")
    page.locator("#prompt").press("Control+Enter")
    expect(page.locator("#clip-title")).to_have_text("from a pasted URL")
    expect(page.locator("#clip-state")).to_have_text("Done", timeout=60_000)
    with api(fault_server) as client:
        pred = client.get(f"/v1/predictions/{clip_id(page)}").json()
    assert pred["input"]["start_image"] == f"{url}/web.png" and pred["input"]["duration"] == 10

    # Keyboard only: skip link, the picker, the prompt, Ctrl+Enter; focus always visible.
    page.goto(f"{fault_server}/")
    expect(page.locator("#auth-status")).to_contain_text("accepts your token")
    page.keyboard.press("Tab")
    expect(page.locator(".skip")).to_be_focused()
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    expect(page.locator("#start_image")).to_be_focused()
    outline = page.evaluate(
        "() => getComputedStyle(document.querySelector('#start_image-drop .button')).outlineStyle"
    )
    assert outline != "none", "the focused picker shows its focus"
    with page.expect_file_chooser() as chooser:
        # Space on the picker Tab reached (checked just above); through its locator, so a late focus change
        # of the page's start-up (the history, the token check) cannot take the key elsewhere.
        page.locator("#start_image").press("Space")
    chooser.value.set_files(str(image_file(640, 400)))
    expect(page.locator("#start_image-info")).to_contain_text("640 × 400 px")
    page.keyboard.press("Tab")  # "Remove" for the image just chosen
    expect(page.locator("#start_image-clear")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.locator("#prompt")).to_be_focused()
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    page.keyboard.type("made with the keyboard")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#clip-title")).to_be_focused()
    expect(page.locator("#clip-title")).to_have_text("made with the keyboard")
    expect(page.locator("#clip-state")).to_have_text("Done", timeout=60_000)
    shots(page, "16-keyboard")


def test_clip_without_auth_streams_the_output(page: Any, open_server: str, image_file) -> None:
    page.goto(f"{open_server}/")
    expect(page.locator("#auth-status")).to_contain_text("needs no token")
    expect(page.locator("#auth")).not_to_have_attribute("open", "")
    new_clip(page, image_file(480, 640), PROMPT)
    expect(page.locator("#clip-state")).to_have_text("Done", timeout=60_000)
    playing = wait_until_playing(page)
    assert playing["src"].startswith(open_server)  # without auth the player streams the URL itself
    assert (playing["width"], playing["height"]) == (720, 960)  # the portrait image's shape
    expect(page.locator("#history > li")).to_have_count(1)
    shots(page, "17-no-auth")


def test_page_and_assets_are_open_while_the_api_needs_the_token(fault_server: str) -> None:
    with httpx.Client(base_url=fault_server) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "script-src" not in page.headers["content-security-policy"]  # only 'self': no inline script
        assert 'src="web/app.js"' in page.text  # relative: the page also works under a proxy's path prefix
        for module in ("app.js", "api.js", "rules.js", "progress.js", "snippets.js", "history.js", "clip.js"):
            assert client.get(f"/web/{module}").headers["content-type"].startswith("text/javascript"), module
        assert client.get("/web/style.css").headers["content-type"].startswith("text/css")
        for path in ("/web/index.py", "/web/..%2Fserver%2Fapp.py", "/web/"):
            assert client.get(path).status_code == 404, path
        for path in ("/v1/predictions", "/v1/i2v/estimate", "/v1/predictions/x/poster.jpg"):
            assert client.get(path).status_code == 401, path
