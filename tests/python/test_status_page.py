"""The status page in a real browser: headless Chromium loads the admin port's `/`, the page's own
script fetches /status.json and renders it, and the numbers it shows move with traffic.

Chromium comes from Debian's `chromium` package (scripts/test installs it). Without it the test
skips locally but fails in CI (CI=true), so a CI image that lost it cannot pass unnoticed.

STATUS_PAGE_SCREENSHOT=PATH also saves a screenshot of the page after some varied traffic
(README's picture, docs/status-page.png, is made this way).
"""

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

CHROMIUM_TIMEOUT_S = 90
# Virtual time the page gets before the DOM is dumped: the first poll and its render need far
# less; virtual time does not pass while the fetch is on the network.
VIRTUAL_TIME_BUDGET_MS = 5000
HEADLESS_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}",
]


def chromium_or_skip():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    message = "chromium is not installed (scripts/test installs Debian's chromium package)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def chromium(exe, *args):
    with tempfile.TemporaryDirectory(prefix="embedcar-chromium-") as profile:
        out = subprocess.run(
            [exe, *HEADLESS_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S,
        )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def rendered(exe, admin):
    """The numbers the page shows, by element id, once its first poll has rendered."""
    for _ in range(3):
        dom = chromium(exe, "--dump-dom", f"{admin}/")
        shown = {
            m.group(1): html.unescape(m.group(2)).strip()
            for m in re.finditer(r'<(?:td|div|span)[^>]*\bid="([\w-]+)"[^>]*>([^<]*)<', dom)
        }
        if shown.get("inputs", "–") != "–":
            return shown, dom
    raise AssertionError(f"the page never rendered its figures:\n{dom[:3000]}")


def number(text):
    return int(text.replace(",", ""))


def embed(proxy, inputs):
    req = urllib.request.Request(
        f"{proxy}/v1/embeddings",
        data=json.dumps({"model": "text-embedding-3-small", "input": inputs}).encode(),
        headers={"content-type": "application/json", "authorization": "Bearer sk-test"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_page_renders_live_numbers_in_a_browser(spawn):
    exe = chromium_or_skip()
    fake = spawn.fake()
    ec = spawn.embedcar(fake)

    before, dom = rendered(exe, ec.admin)
    assert number(before["inputs"]) == 0
    assert number(before["upstream-calls"]) == 0
    assert before["breaker"] == "closed"
    assert before["ready"] == "ready"
    assert number(before["limit"]) >= 1
    assert "<svg" in dom, "the sparklines are drawn"

    # Three new inputs, then the same three again: answered from the cache.
    for _ in range(2):
        assert embed(ec.url, ["red", "green", "blue"]) == 200

    after, _ = rendered(exe, ec.admin)
    assert number(after["inputs"]) == 6
    assert number(after["upstream-inputs"]) == 3
    assert number(after["cache-hits"]) == 3
    assert number(after["saved"]) == 3
    assert number(after["upstream-calls"]) == fake.stats()["embedding_calls"] >= 1
    assert after["hit-ratio"] == "50.0% hits"
    assert after["recent"].endswith(" ms")

    path = os.environ.get("STATUS_PAGE_SCREENSHOT")
    if path:
        screenshot(exe, ec, os.path.abspath(path))


def screenshot(exe, ec, path):
    """A minute of varied traffic (new inputs, repeats, a refused request) so the sparklines
    have a shape, then the page at 1200x800."""
    for round_ in range(13):
        fresh = [f"input {round_}-{i}" for i in range(1 + round_ % 4 * 3)]
        embed(ec.url, fresh)
        embed(ec.url, fresh[: 1 + round_ % 3])
        if round_ % 5 == 2:
            embed(ec.url, [""])
        time.sleep(5)
    chromium(exe, f"--screenshot={path}", "--window-size=1200,800", "--hide-scrollbars",
             f"{ec.admin}/")
    assert os.path.getsize(path) > 0
