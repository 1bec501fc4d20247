"""The test server in a child process: ``start_subprocess`` runs ``python -m nbllm.testing``.

A child of its own gets its own CPU core, so that benchmarks measure the client, not a
server that shares the client's interpreter. The child prints one line, ``URL_LINE_PREFIX``
then its URL, once it listens; SIGTERM stops it gracefully (exit code 0).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, cast

from nbllm.engines.child_process import ServerProcess
from nbllm.testing.options import Fault
from nbllm.testing.server import TestServer

__all__ = ["URL_LINE_PREFIX", "SubprocessServer", "start_subprocess"]

#: The first stdout line of ``python -m nbllm.testing`` starts with this, then the URL.
URL_LINE_PREFIX = "nbllm test server listening on "

_START_TIMEOUT_S = 30.0


def _cli_args(options: Mapping[str, Any]) -> list[str]:
    """Translate TestServer keyword options into ``python -m nbllm.testing`` arguments."""
    args: list[str] = []
    for name, value in options.items():
        if value is None:
            continue
        if name == "latency":
            text = ",".join(str(float(x)) for x in value) if isinstance(value, tuple) else value
            args += ["--latency", str(text)]
        elif name == "faults":
            for kind, p in value.items():
                args += ["--fault-rate", f"{Fault.parse(kind).value}={float(p)}"]
        elif name == "log_path":
            args += ["--log", os.fspath(value)]
        elif name == "batch_delay_s":
            args += ["--batch-delay", str(value)]
        elif name in ("shared_history", "prompt_cache"):  # switches
            args += ["--" + name.replace("_", "-")] if value else []
        elif name in (
            "rpm",
            "window_s",
            "fault_first",
            "hang_s",
            "retry_after",
            "seed",
            "bad_json_first",
            "latency_sigma",
            "api_key",
            "host",
            "port",
            "batch_max_requests",
            "batch_fail_first",
            "batch_expire_first",
        ):
            args += ["--" + name.replace("_", "-"), str(value)]
        else:
            msg = f"start_subprocess() got an unexpected option {name!r}"
            raise TypeError(msg)
    return args


class SubprocessServer:
    """``python -m nbllm.testing`` running in a child process (so it gets its own CPU core).

    Use ``start_subprocess(...)`` to create one; ``.url`` is read from its first stdout line.
    """

    def __init__(self, args: Sequence[str], timeout: float = _START_TIMEOUT_S) -> None:
        self._child = ServerProcess(
            [sys.executable, "-m", "nbllm.testing", *args],
            url_prefix=URL_LINE_PREFIX,
            name="the nbllm test server",
            parent_pid_option="--parent-pid",  # it stops if this process is killed
        )
        self.url = self._child.start(timeout)

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The child process."""
        # Set by the start() in __init__, which raises where there is no child.
        return cast("subprocess.Popen[bytes]", self._child.process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr_text(self) -> str:
        """What the child wrote to stderr so far (for error messages)."""
        return self._child.stderr_text()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (a graceful stop), then kill if it lingers; idempotent. Returns the exit code."""
        return self._child.stop(timeout)

    def __enter__(self) -> SubprocessServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SubprocessServer pid={self.pid} {self.url or 'starting'}>"


def start_subprocess(*, timeout: float = _START_TIMEOUT_S, **options: Any) -> SubprocessServer:
    """Run the server as ``python -m nbllm.testing`` in a child process and wait for its URL.

    Takes the same options as ``TestServer`` (``log_path`` becomes ``--log``), and refuses
    a bad one with the same ``ConfigError``, before any child starts. Raises
    ``ServerStartError`` (a ``RuntimeError``), with the end of the child's stderr, if no URL
    line comes within ``timeout`` seconds.
    """
    TestServer(**options)  # checks the options only: it listens once started
    return SubprocessServer(_cli_args(options), timeout=timeout)
