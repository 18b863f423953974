"""Fixtures for the official-client tests: a fake OpenAI upstream and an embedcar in front of it,
both real processes on free ports, built by `scripts/test` before pytest runs.

Binaries are found in target/debug unless EMBEDCAR_BIN / FAKE_UPSTREAM_BIN say otherwise.
"""

import os
import re
import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EMBEDCAR_BIN = os.environ.get("EMBEDCAR_BIN", str(ROOT / "target/debug/embedcar"))
FAKE_BIN = os.environ.get("FAKE_UPSTREAM_BIN", str(ROOT / "target/debug/examples/fake_upstream"))
STARTUP_TIMEOUT_S = 30


class Proc:
    """A child process whose stdout is read until a line matches `ready`, then drained."""

    def __init__(self, args, ready, env=None):
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,  # the fake exits when this pipe closes
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            env={**os.environ, **(env or {})},
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
