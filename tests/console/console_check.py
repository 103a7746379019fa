"""The console in a real browser: Debian's Chromium, headless, driven by
Playwright, against a running gateway (started by tests/tests/console.rs).

    console_check.py open URL SCREENSHOTS   the default models, auth off
    console_check.py auth URL ADMIN_KEY VIEWER_KEY CLIENT_KEY   auth on, echo

Prints "ok" when every check held; any failed check raises.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

CHROMIUM = os.environ.get("INFERGATE_CHROMIUM", "/usr/bin/chromium")
# Headless, sandbox off (CI runs as root), nothing fetched from the network.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# Generous for a loaded 2-core CI machine; the worker's return is held to 10 s.
WAIT_MS = 30_000
MILLIS = re.compile(r"^\d+(\.\d+)? ms$")

# Every state a worker's row shows, as the page renders it.
WATCH_STATES = """(worker) => {
    window.__states = [];
    const seen = () => {
        const row = document.querySelector(`tr[data-worker='${worker}']`);
        if (row) {
            window.__states.push([row.dataset.state, row.querySelector('.pid').textContent]);
        }
    };
    const pools = document.getElementById('pools');
    new MutationObserver(seen).observe(pools, {childList: true, subtree: true});
}"""
# The chat answer's length each time the page changes, and whether it was still streaming.
WATCH_GROWTH = """() => {
    window.__growth = [];
    new MutationObserver(() => {
        const a = document.getElementById('chat-answer');
        const state = document.getElementById('play-state').dataset.state;
        if (a) window.__growth.push([a.textContent.length, state]);
    }).observe(document.getElementById('main'),
               {childList: true, subtree: true, characterData: true, attributes: true});
}"""


class Console:
    """One page on the console, with every console message it logged."""

    def __init__(self, browser: Browser, url: str, viewport: dict[str, int]) -> None:
        self.context = browser.new_context(viewport=viewport)
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        self.page: Page = self.context.new_page()
        self.url = url
        self.messages: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.messages.append(f"pageerror: {e}"))

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type in ("error", "warning"):
            self.messages.append(f"{msg.type}: {msg.text}")

    def open(self) -> Page:
        self.page.goto(self.url + "/console")
        return self.page

    def no_errors(self, allowed: int = 0, why: str = "") -> None:
        """No console errors or warnings, except `allowed` the test caused (`why`)."""
        assert len(self.messages) <= allowed, (
            f"console messages ({why or 'none expected'}): {self.messages}"
        )

    def close(self) -> None:
        self.context.close()


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def get_json(url: str, key: str | None = None) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def post_json(url: str, body: dict, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def status_code(url: str, headers: dict[str, str]) -> int:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# ---- the status view -------------------------------------------------------


def check_status_lists_every_pool_and_worker(page: Page, url: str) -> None:
    status = get_json(url + "/console/api/status")
    assert status["pools"], "the gateway reports no pools"
    for pool in status["pools"]:
        card = page.locator(f"article[data-pool='{pool['name']}']")
        expect(card).to_be_visible(timeout=WAIT_MS)
        for worker in pool["workers"]:
            row = card.locator(f"tr[data-worker='{worker['id']}']")
            expect(row).to_be_visible()
            expect(row.locator(".pid")).to_have_text(str(worker["pid"]))


def check_killed_worker_leaves_and_returns(page: Page, worker: str) -> None:
    """SIGKILL `worker`'s process: the page shows it not serving, then
    serving again with a new pid and one more restart, within 10 s."""
    row = page.locator(f"tr[data-worker='{worker}']")
    expect(row).to_have_attribute("data-state", "serving", timeout=WAIT_MS)
    pid = int(row.locator(".pid").inner_text())
    restarts = int(row.locator(".restarts").inner_text())
    # Every state the row shows from now on, as the page renders it.
    page.evaluate(WATCH_STATES, worker)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    back = page.locator(f"tr[data-worker='{worker}'][data-state='serving'] .restarts")
    expect(back).to_have_text(str(restarts + 1), timeout=10_000)
    elapsed = time.monotonic() - killed
    new_pid = int(row.locator(".pid").inner_text())
    assert new_pid != pid, f"{worker} still shows pid {pid}"
    # The page samples once a second: a worker back within one sample shows
    # only its new pid. Either way the page showed the old process gone.
    states = page.evaluate("window.__states")
    gone = [s for s in states if s[0] != "serving" or s[1] != str(pid)]
    assert gone, f"the page never showed {worker} gone: {states}"
    print(
        f"{worker}: pid {pid} killed, shown gone, then serving as pid {new_pid}",
        f"after {elapsed:.1f} s",
        file=sys.stderr,
    )


# ---- the playground --------------------------------------------------------


def to_playground(page: Page) -> None:
    # By keyboard: the tab list moves with the arrow keys.
    page.focus("#tab-status")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-play")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#tab-play")).to_be_focused()
    expect(page.locator("#view-play")).to_be_visible()


def pick(page: Page, model: str, mode: str) -> None:
    page.select_option("#model", model)
    page.check(f"input[name=mode][value={mode}]")


def run(page: Page) -> None:
    # By keyboard: Enter on the focused button.
    page.focus("#run")
    page.keyboard.press("Enter")
    expect(page.locator("#play-state")).to_have_attribute("data-state", "done", timeout=WAIT_MS)


def check_chat_streams_word_by_word(page: Page, words: int = 80) -> str:
    pick(page, "echo", "chat")
    text = " ".join(f"word{i}" for i in range(words))
    page.fill("#chat-message", text)
    # The answer's length each time the page changes it, and whether it was still streaming.
    page.evaluate(WATCH_GROWTH)
    run(page)
    answer = page.inner_text("#chat-answer")
    assert answer == text, f"echo answered {answer!r}"
    partial = {
        n
        for n, state in page.evaluate("window.__growth")
        if state == "streaming" and 0 < n < len(text)
    }
    assert len(partial) >= 3, f"the answer did not grow while streaming: {sorted(partial)}"
    expect(page.locator("#ttft b")).to_have_text(MILLIS)
    expect(page.locator("#usage b")).to_contain_text(f"{words} completion")
    expect(page.locator("tr[data-header='x-request-id']")).to_be_visible()
    return answer


def check_embeddings_cosine(page: Page, public: str) -> None:
    pick(page, "minilm", "embeddings")
    texts = ["A cat sits on the mat.", "A kitten rests on a rug."]
    page.fill("#embed-inputs", "\n".join(texts))
    run(page)
    shown = float(page.get_attribute("#cosine td[data-i='0'][data-j='1']", "data-cosine"))
    assert (
        abs(float(page.get_attribute("#cosine td[data-i='0'][data-j='0']", "data-cosine")) - 1)
        < 1e-5
    )
    # The same vectors, asked for directly, give the same cosine.
    out = post_json(public + "/v1/embeddings", {"model": "minilm", "input": texts})
    a, b = (d["embedding"] for d in sorted(out["data"], key=lambda d: d["index"]))
    cos = sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )
    assert abs(shown - cos) < 1e-4, f"page cosine {shown}, direct {cos}"
    assert 0.3 < cos < 0.99, f"cosine of two similar sentences: {cos}"


def outputs_on_page(page: Page) -> dict[str, object]:
    rows = page.locator("#outputs tr[data-output]")
    return {
        rows.nth(i).get_attribute("data-output"): json.loads(
            rows.nth(i).locator("code.data").inner_text()
        )
        for i in range(rows.count())
    }


def copied_curl(page: Page) -> str:
    page.click("#copy-curl")
    expect(page.locator("#copied")).to_have_text("Copied.")
    return page.evaluate("navigator.clipboard.readText()")


def run_curl(command: str, key: str | None = None) -> dict:
    env = dict(os.environ)
    if key:
        env["INFERGATE_KEY"] = key
    out = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    return json.loads(out.stdout)


def check_sentiment_form_and_curl(page: Page) -> None:
    pick(page, "sentiment", "tensors")
    field = page.locator("textarea[data-input='text']")
    expect(field).to_be_visible(timeout=WAIT_MS)
    expect(field).to_have_attribute("data-datatype", "BYTES")
    field.fill("I love how fast and friendly this is.\nThis was a terrible, broken experience.")
    run(page)
    shown = outputs_on_page(page)
    assert shown["label"] == ["positive", "negative"], f"sentiment on the page: {shown}"
    # The copied command, run in a shell, answers the same.
    direct = {t["name"]: t["data"] for t in run_curl(copied_curl(page))["outputs"]}
    assert direct["label"] == shown["label"], f"curl {direct} vs page {shown}"
    for a, b in zip(direct["probabilities"], shown["probabilities"], strict=True):
        assert abs(a - b) < 1e-5, f"curl {direct} vs page {shown}"


def check_image_upload(page: Page) -> None:
    from PIL import Image

    pick(page, "tiny_cnn", "tensors")
    expect(page.locator("#image-file")).to_be_visible(timeout=WAIT_MS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frame.png"
        Image.new("RGB", (96, 80), (200, 40, 40)).save(path)
        page.set_input_files("#image-file", str(path))
        run(page)
    shown = outputs_on_page(page)
    assert len(shown["probabilities"]) == 10 and len(shown["class"]) == 1, shown
    assert "--data-binary '@frame.png'" in page.inner_text("#curl")


def fits_width(page: Page) -> None:
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than the window"


# ---- the two scenarios -------------------------------------------------------


def check_bounds_of_an_open_console(url: str) -> None:
    """An open console (auth off) answers only to local names, serves its
    playground only to its own page, and only the client API through it."""
    # A page on another site that rebinds its name to this machine: 421.
    assert status_code(url + "/console/api/status", {"Host": "rebound.example:8081"}) == 421
    assert status_code(url + "/console/api/status", {}) == 200
    # A form or script from another site (no console header, or the browser says so): 403.
    models = url + "/console/api/play/v1/models"
    assert status_code(models, {}) == 403
    assert status_code(models, {"x-infergate-console": "1", "Sec-Fetch-Site": "cross-site"}) == 403
    assert status_code(models, {"x-infergate-console": "1"}) == 200
    # Only /v1 and /v2 of the client API, not its metrics or anything else.
    for path in ("/metrics", "/healthz", "/../admin/config", "/v1"):
        assert status_code(url + "/console/api/play" + path, {"x-infergate-console": "1"}) == 404, (
            path
        )


def open_console(url: str, shots: Path) -> None:
    shots.mkdir(parents=True, exist_ok=True)
    session = get_json(url + "/console/api/session")
    assert session["role"] == "admin" and session["playground"], session
    public = session["public_url"]
    check_bounds_of_an_open_console(url)
    with chromium() as browser:
        console = Console(browser, url, DESKTOP)
        page = console.open()
        expect(page.locator("#view-status")).to_be_visible()
        expect(page.locator("#live")).to_have_attribute("data-live", "on", timeout=WAIT_MS)
        check_status_lists_every_pool_and_worker(page, url)
        check_killed_worker_leaves_and_returns(page, "echo-0")
        console.no_errors()

        to_playground(page)
        check_chat_streams_word_by_word(page)
        page.screenshot(path=str(shots / "console-chat.png"), full_page=True)
        check_embeddings_cosine(page, public)
        page.screenshot(path=str(shots / "console-embeddings.png"), full_page=True)
        check_image_upload(page)
        check_sentiment_form_and_curl(page)
        page.screenshot(path=str(shots / "console-tensors.png"), full_page=True)
        console.no_errors()

        # Traffic for the charts and an error for the list, then the status view.
        for _ in range(20):
            post_json(public + "/v1/embeddings", {"model": "minilm", "input": ["hello"]})
        assert status_code(public + "/v2/models/no-such-model/ready", {}) == 404
        page.click("#tab-status")
        expect(page.locator("#models tr[data-model='minilm']")).to_be_visible(timeout=WAIT_MS)
        expect(page.locator("#errors tbody tr[data-request-id]").first).to_be_visible(
            timeout=WAIT_MS
        )
        # minilm's and sentiment's calls went through the response cache.
        expect(page.locator("#cache-ratio")).to_contain_text("lookups hit")
        page.wait_for_timeout(1500)
        page.screenshot(path=str(shots / "console-status.png"), full_page=True)
        fits_width(page)
        console.no_errors()
        console.close()

        # A phone's width: everything fits, tables scroll inside their boxes.
        phone = Console(browser, url, PHONE)
        page = phone.open()
        expect(page.locator("#models tr[data-model='minilm']")).to_be_visible(timeout=WAIT_MS)
        fits_width(page)
        page.screenshot(path=str(shots / "console-phone.png"), full_page=False)
        page.click("#tab-play")
        expect(page.locator("#model option[value='echo']")).to_be_attached(timeout=WAIT_MS)
        fits_width(page)
        phone.no_errors()
        phone.close()


def auth_console(url: str, admin_key: str, viewer_key: str, client_key: str) -> None:
    session = get_json(url + "/console/api/session")
    assert session == {"sign_in": True}, session
    with chromium() as browser:
        console = Console(browser, url, DESKTOP)
        page = console.open()
        expect(page.locator("#login")).to_be_visible()
        expect(page.locator("#view-status")).to_be_hidden()
        # A wrong key is refused; so is a client's key that is no console user's.
        page.fill("#key", "ig_wrong-key-000000000000000000000000")
        page.keyboard.press("Enter")
        expect(page.locator("#login-error")).to_have_text("That key was refused.")
        page.fill("#key", client_key)
        page.keyboard.press("Enter")
        expect(page.locator("#login-error")).to_have_text("This key may not use the console.")
        expect(page.locator("#view-status")).to_be_hidden()
        # The browser reports each refused request (401, then 403): those two only.
        console.no_errors(allowed=2, why="the refused sign-ins")
        refused = list(console.messages)
        assert all("401" in m or "403" in m for m in refused), refused

        # A viewer sees the status but not the playground, nor may call it.
        page.fill("#key", viewer_key)
        page.keyboard.press("Enter")
        expect(page.locator("article[data-pool='echo'] tr[data-worker='echo-0']")).to_be_visible(
            timeout=WAIT_MS
        )
        expect(page.locator("#who")).to_contain_text("viewer")
        # The alias's variants with their weights as the split uses them.
        canary = page.locator("tr[data-alias='talk'][data-variant='canary']")
        expect(canary.locator("td.num").first).to_have_text("20")
        expect(canary.locator("td.num").nth(1)).to_have_text("20.0")
        page.click("#tab-play")
        expect(page.locator("#play-denied")).to_be_visible()
        expect(page.locator("#play-form")).to_be_hidden()
        viewer = {"Authorization": f"Bearer {viewer_key}", "x-infergate-console": "1"}
        assert status_code(url + "/console/api/play/v1/models", viewer) == 403
        admin = {"Authorization": f"Bearer {admin_key}", "x-infergate-console": "1"}
        assert status_code(url + "/console/api/play/v1/models", admin) == 200
        # Without the page's header (a form another site posts): refused.
        assert (
            status_code(
                url + "/console/api/play/v1/models",
                {"Authorization": f"Bearer {admin_key}"},
            )
            == 403
        )
        page.click("#sign-out")
        expect(page.locator("#login")).to_be_visible()

        # An admin uses the playground; the curl command names the key only as $INFERGATE_KEY.
        page.fill("#key", admin_key)
        page.keyboard.press("Enter")
        expect(page.locator("#who")).to_contain_text("admin")
        to_playground(page)
        expect(page.locator("#model option[value='echo']")).to_be_attached(timeout=WAIT_MS)
        pick(page, "talk", "tensors")
        page.fill(
            "#tensor-json",
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "datatype": "FP32",
                            "shape": [2],
                            "data": [1.5, 2.5],
                        }
                    ]
                }
            ),
        )
        run(page)
        shown = outputs_on_page(page)
        command = copied_curl(page)
        assert "$INFERGATE_KEY" in command and admin_key not in command, command
        direct = {t["name"]: t["data"] for t in run_curl(command, admin_key)["outputs"]}
        assert direct == shown == {"x": [1.5, 2.5]}, f"curl {direct} vs page {shown}"
        variant = page.locator("tr[data-header='x-infergate-variant'] code")
        expect(variant).to_have_text(re.compile("^(stable|canary)$"))
        assert admin_key not in page.content(), "the key is in the page"
        console.no_errors(allowed=2, why="the refused sign-ins")
        console.close()


def main() -> None:
    scenario, url, *rest = sys.argv[1:]
    if scenario == "open":
        open_console(url, Path(rest[0]))
    elif scenario == "auth":
        auth_console(url, *rest)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    print("ok")


if __name__ == "__main__":
    main()
