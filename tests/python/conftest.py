"""Fixtures for the official-client tests: a fake OpenAI upstream and an embedcar in front of it,
both real processes on free ports, built by `scripts/test` before pytest runs.

Binaries are found in target/debug unless EMBEDCAR_BIN / FAKE_UPSTREAM_BIN say otherwise.
"""

import json
import os
import re
import time
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EMBEDCAR_BIN = os.environ.get("EMBEDCAR_BIN", str(ROOT / "target/debug/embedcar"))
FAKE_BIN = os.environ.get("FAKE_UPSTREAM_BIN", str(ROOT / "target/debug/fake-openai"))
STARTUP_TIMEOUT_S = 30
# embedcar reads every EMBEDCAR_* variable as configuration and refuses unknown keys, so the
# one that steers these tests is kept out of the children's environment. (Test switches of our
# own, like HANG_SCENARIO_FULL, are named outside that prefix for the same reason.)
HARNESS_ENV = {"EMBEDCAR_BIN"}


class Proc:
    """A child process whose stdout is read until a line matches `ready`, then drained."""

    def __init__(self, args, ready, env=None):
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,  # the fake exits when this pipe closes
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            env={**{k: v for k, v in os.environ.items() if k not in HARNESS_ENV}, **(env or {})},
        )
        self.match = None
        found = threading.Event()

        def read():
            for line in self.proc.stdout:
                if self.match is None:
                    m = re.search(ready, line)
                    if m:
                        self.match = m
                        found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(STARTUP_TIMEOUT_S) or self.match is None:
            self.stop()
            raise RuntimeError(f"{args[0]} did not start (no line matching {ready!r})")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def fake_upstream():
    """Base URL of the fake upstream, e.g. http://127.0.0.1:41234."""
    p = Proc([FAKE_BIN, "--port", "0"], r"LISTENING (http://\S+)")
    yield p.match.group(1)
    p.stop()


@pytest.fixture(scope="session")
def embedcar(fake_upstream):
    """Base URL of an embedcar in front of the fake upstream, e.g. http://127.0.0.1:41235."""
    p = Proc(
        [EMBEDCAR_BIN, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
         "--upstream", fake_upstream],
        r"listening addr=(\S+) admin_addr=(\S+)",
    )
    yield f"http://{p.match.group(1)}"
    p.stop()


# ---------------------------------------------------------------------------------------------
# Extra processes on demand: fake upstreams with their own flags, embedcars with their own
# environment (EMBEDCAR_<SECTION>__<KEY>) or flags. Each test (or module) gets its own, so a
# breaker one test opens or a slow upstream another configures cannot leak into the next.
# ---------------------------------------------------------------------------------------------


def _get_text(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


class Fake:
    """A fake upstream process: `url`, and `stats()` / `reset()` from its control plane."""

    def __init__(self, proc):
        self.proc = proc
        self.url = proc.match.group(1)

    def stats(self):
        """Counters since start or reset. Note: a fake started with --max-connections N serves
        this on a connection like any other, so it waits while N others are held open."""
        return json.loads(_get_text(f"{self.url}/__fake/stats"))

    def reset(self):
        req = urllib.request.Request(f"{self.url}/__fake/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=5).close()


class Embedcar:
    """An embedcar process: `url` (traffic), `admin` (admin listener) and its metrics."""

    def __init__(self, proc):
        self.proc = proc
        self.url = f"http://{proc.match.group(1)}"
        self.admin = f"http://{proc.match.group(2)}"

    def stop(self):
        """Stops embedcar (SIGTERM, drain); its upstream connections close with it."""
        self.proc.stop()

    def wait_ready(self, timeout=30):
        """Waits until /readyz says ready (the tokenizer's tables load at start), as an
        orchestrator would before sending traffic."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                _get_text(f"{self.admin}/readyz")
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"embedcar not ready within {timeout} s")

    def metrics_text(self):
        return _get_text(f"{self.admin}/metrics")

    def metric(self, name, **labels):
        """The sum of every sample of `name` whose labels include `labels` (0 if none)."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            if line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$", line)
            if not m or m.group(1) != name:
                continue
            have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            if all(have.get(k) == str(v) for k, v in labels.items()):
                total += float(m.group(3))
        return total


class Spawner:
    """Starts fake upstreams and embedcars, and stops all of them at `close()`."""

    def __init__(self):
        self.procs = []

    def fake(self, *args):
        """A fake upstream; `args` are its flags, e.g. ("--delay-ms", "1400")."""
        p = Proc([FAKE_BIN, "--port", "0", *map(str, args)], r"LISTENING (http://\S+)")
        self.procs.append(p)
        return Fake(p)

    def embedcar(self, upstream, *args, env=None):
        """An embedcar in front of `upstream` (a URL or a Fake), with extra flags and env vars,
        e.g. env={"EMBEDCAR_LIMITS__MAX_CONCURRENCY": "3"}."""
        url = upstream.url if isinstance(upstream, Fake) else upstream
        p = Proc(
            [EMBEDCAR_BIN, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
             "--upstream", url, *map(str, args)],
            r"listening addr=(\S+) admin_addr=(\S+)",
            env={k: str(v) for k, v in (env or {}).items()},
        )
        self.procs.append(p)
        return Embedcar(p)

    def close(self):
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()


@pytest.fixture
def spawn():
    """A Spawner whose processes live for one test."""
    s = Spawner()
    yield s
    s.close()


@pytest.fixture(scope="module")
def spawn_module():
    """A Spawner whose processes live for one test module."""
    s = Spawner()
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# Measurements for the end of the run: tests append rows with `measurements.append(dict)`, and
# the terminal summary prints them as a table (so CI logs show the numbers without -s). With
# MEASUREMENTS_JSON=PATH the rows are also written to PATH as JSON.
# ---------------------------------------------------------------------------------------------

_MEASUREMENTS = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def measurements(pytestconfig):
    return pytestconfig.stash.setdefault(_MEASUREMENTS, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.stash.get(_MEASUREMENTS, [])
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    terminalreporter.section("measurements")
    terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        terminalreporter.write_line("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    path = os.environ.get("MEASUREMENTS_JSON")
    if path:
        Path(path).write_text(json.dumps(rows, indent=2) + "\n")
