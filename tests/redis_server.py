"""A real ``redis-server`` on a free loopback port, started and stopped by the tests.

Debian's ``redis-server`` (``tools/test.sh`` installs it) runs with no persistence
(``--save '' --appendonly no``), bound to 127.0.0.1, in the test's own folder; it is stopped
by its pid. ``kill()`` stops it the hard way (SIGKILL) and ``start()`` brings it back, empty,
on the same port, so a test can take Redis away mid-run.

Without ``redis-server`` (or the ``redis`` package) the tests that need it are skipped with
the reason, and fail when ``CI=true``, as the browser test does for Chromium.

Use it as ``with RedisServer(tmp_path) as server: ...`` (``server.url``); pytest puts tests/
on ``sys.path``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

__all__ = ["RedisServer", "require_redis"]

SETUP_HINT = "run `bash tools/test.sh` (it installs Debian's redis-server and the redis package)"
_START_TIMEOUT_S = 10.0


def _unavailable(reason: str) -> None:
    message = f"{reason}; {SETUP_HINT}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_redis() -> str:
    """The path of ``redis-server``, once it and the ``redis`` package are known to be here."""
    binary = os.environ.get("NBLLM_REDIS_SERVER") or shutil.which("redis-server")
    if binary is None:
        _unavailable("no redis-server on PATH")
    elif not os.access(binary, os.X_OK):
        _unavailable(f"no redis-server at {binary} (NBLLM_REDIS_SERVER)")
    try:
        import redis  # noqa: F401
    except ImportError:
        _unavailable("the redis package is not installed")
    assert binary is not None
    return binary


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process; ``url`` carries the password when there is one."""

    def __init__(self, folder: Path, *, password: str | None = None) -> None:
        self.binary = require_redis()
        self.folder = folder
        self.password = password
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--save", "", "--appendonly", "no"]
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.folder
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:  # a fresh process: nothing to wait on but its port opening
            if self.process.poll() is not None:
                msg = f"redis-server exited with status {self.process.returncode}"
                raise RuntimeError(msg)
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    msg = f"redis-server did not open port {self.port}"
                    raise RuntimeError(msg) from None
                time.sleep(0.02)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        """Stop it at once (SIGKILL by its pid), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None
