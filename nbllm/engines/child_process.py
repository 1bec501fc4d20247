"""A server in a child process: started, its URL read from the line it prints, stopped.

``nbllm serve`` (which ``Worker`` runs) and the test server (``nbllm.testing``'s
``start_subprocess``) each print one line, a prefix then their URL, once they listen.
``ServerProcess`` starts such a command so that it imports this very nbllm, waits a bounded
time for that line, keeps the child's stderr in a file for error messages, and stops the
child: SIGTERM, then SIGKILL if it lingers.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, cast

from nbllm.errors import EngineUnavailable

__all__ = ["ServerProcess", "ServerStartError"]

# A child that printed something other than its URL line is exiting: this bounds the wait.
_EXIT_WAIT_S = 5.0


class ServerStartError(EngineUnavailable, RuntimeError):
    """The child printed no URL line: it exited first, or did not listen in time.

    The message ends with what the child wrote to stderr.
    """


class ServerProcess:
    """Runs ``command`` in a child process that prints ``url_prefix`` then its URL.

    The child finds this nbllm on its ``PYTHONPATH``, also where it is a checkout that is
    not installed. ``env`` adds to this process's environment: the way to hand the child a
    secret, which no other user can read with ``ps``. ``name`` says what the child is in
    error messages.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        url_prefix: str,
        name: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.command = list(command)
        self.url_prefix = url_prefix
        self.name = name
        self._extra_env = dict(env or {})
        #: The child, once started.
        self.process: subprocess.Popen[bytes] | None = None
        #: What the child printed after ``url_prefix``, once it listens.
        self.url: str | None = None
        self._stderr: IO[bytes] | None = None
        self._stopped = False

    def __repr__(self) -> str:  # no environment: it may hold a key
        where = "not started" if self.process is None else f"pid={self.process.pid}"
        if self.url:
            where += f" {self.url}"
        return f"<ServerProcess {self.name}: {where}>"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def returncode(self) -> int | None:
        """The child's exit code; None while it runs or before it started."""
        return None if self.process is None else self.process.poll()

    def start(self, timeout: float) -> str:
        """Start the child and return its URL once it prints it (within ``timeout`` s).

        Raises ``ServerStartError`` with the end of the child's stderr, the child then
        stopped, where no URL line comes.
        """
        if self.process is not None:
            msg = f"{self.name} was already started"
            raise RuntimeError(msg)
        # A file, not a pipe: it never fills up and blocks the child. Closed in stop().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                env=self._child_env(),
            )
            self.url = self._read_url(self.process, timeout)
        except BaseException:
            self._kill()
            self.stop()
            raise
        return self.url

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self._extra_env)
        return env

    def _read_url(self, process: subprocess.Popen[bytes], timeout: float) -> str:
        stdout = cast("IO[bytes]", process.stdout)  # a pipe: Popen was given stdout=PIPE
        lines: queue.Queue[bytes] = queue.Queue()
        reader = threading.Thread(
            target=lambda: lines.put(stdout.readline()), name="nbllm-child-stdout", daemon=True
        )
        reader.start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            self._kill()
            reader.join(_EXIT_WAIT_S)  # the kill ends its read
            msg = f"{self.name} did not start listening within {timeout:g} s"
            raise ServerStartError(self.with_stderr(msg)) from None
        text = line.decode("utf-8", "replace").strip()
        if not text.startswith(self.url_prefix):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(_EXIT_WAIT_S)  # it printed no URL: it is exiting
            msg = f"{self.name} failed to start (exit code {process.returncode})"
            raise ServerStartError(self.with_stderr(msg))
        return text.removeprefix(self.url_prefix)

    def stderr_text(self, last_chars: int | None = None) -> str:
        """What the child wrote to stderr (its last ``last_chars`` bytes); "" once stopped."""
        stderr = self._stderr
        if stderr is None or stderr.closed:
            return ""
        stderr.flush()
        size = stderr.seek(0, os.SEEK_END)
        stderr.seek(0 if last_chars is None else max(0, size - last_chars))
        return stderr.read().decode("utf-8", "replace")

    def with_stderr(self, message: str, last_chars: int = 2000) -> str:
        """``message``, then the end of the child's stderr if it wrote any."""
        tail = self.stderr_text(last_chars).strip()
        return f"{message}; its stderr ends with:\n{tail}" if tail else message

    def _kill(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; idempotent. Returns the exit code.

        None where the child never started.
        """
        process = self.process
        if not self._stopped:
            self._stopped = True
            try:
                if process is not None and process.poll() is None:
                    process.terminate()
                    try:
                        process.wait(timeout)
                    except subprocess.TimeoutExpired:
                        self._kill()
            finally:
                if process is not None and process.stdout is not None:
                    process.stdout.close()
                if self._stderr is not None:
                    self._stderr.close()
        return None if process is None else process.returncode
