"""A server in a child process: started, its URL read from the line it prints, stopped.

``nbllm serve`` (which ``Worker`` runs) and the test server (``nbllm.testing``'s
``start_subprocess``) each print one line, a prefix then their URL, once they listen.
``ServerProcess`` starts such a command so that it imports this very nbllm, waits a bounded
time for that line, keeps the child's stderr in a file for error messages, and stops the
child: SIGTERM, then SIGKILL if it lingers.

A child must not outlive this process, however it ends (a SIGKILL runs no ``atexit``).
``ServerProcess`` keeps a pipe to the child's stdin open until ``stop()``, and can pass
the child this process's pid; ``ParentWatch`` is the child's side, which sees either go.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, BinaryIO, cast

from nbllm.errors import EngineUnavailable

__all__ = ["ParentWatch", "ServerProcess", "ServerStartError"]

_log = logging.getLogger("nbllm.child")

# A child that printed something other than its URL line is exiting: this bounds the wait.
_EXIT_WAIT_S = 5.0
# How often a child asks whether its parent still runs: one cheap system call a second.
_PARENT_POLL_S = 1.0
# prctl(2): the signal the kernel sends this process when its parent dies.
_PR_SET_PDEATHSIG = 1
# Not SIGTERM: the kernel sends it also when only the parent's thread that started the
# child ends (e.g. a worker started in a thread pool's thread), and a SIGTERM of the parent's
# own asks for a drain. The handler checks whether the parent really has gone.
if sys.platform != "win32":  # only used where prctl is, on Linux
    _PARENT_DEATH_SIGNAL = signal.SIGHUP


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

    The child's stdin is a pipe this process holds open, unwritten, until ``stop()``: a
    child that watches it reads EOF once this process has gone, however it ended. (A child
    of this process made by a bare ``os.fork()``, without exec, shares the pipe and delays
    that EOF until it ends too; ``parent_pid_option`` has no such gap.) With
    ``parent_pid_option`` (e.g. ``"--parent-pid"``), ``start()`` adds it and this process's
    pid to the command: the pid of the process that starts the child, after a fork too.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        url_prefix: str,
        name: str,
        env: Mapping[str, str] | None = None,
        parent_pid_option: str | None = None,
    ) -> None:
        self.command = list(command)
        self.parent_pid_option = parent_pid_option
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
        command = list(self.command)
        if self.parent_pid_option is not None:
            command += [self.parent_pid_option, str(os.getpid())]
        try:
            # stdin: see the class docstring. Popen's close_fds keeps the pipe's write end
            # out of every other child this process starts, so that its EOF comes in time.
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
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
                # stdin last: its EOF would stop a watching child without its drain.
                streams = () if process is None else (process.stdout, process.stdin)
                for stream in streams:
                    if stream is not None:
                        with contextlib.suppress(OSError):  # e.g. a broken pipe
                            stream.close()
                if self._stderr is not None:
                    self._stderr.close()
        return None if process is None else process.returncode


# --------------------------------------------------------------------- the child's side


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _set_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` when the parent dies (0: never); False where it cannot."""
    if not sys.platform.startswith("linux"):  # elsewhere no prctl, or one of another meaning
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # no libc with prctl (e.g. a static musl build)
        return False


class _EofProtocol(asyncio.Protocol):
    def __init__(self, on_eof: Callable[[], None]) -> None:
        self.on_eof = on_eof
        self.closing = False

    def data_received(self, data: bytes) -> None:
        pass  # the parent writes nothing: only the pipe's end matters

    def eof_received(self) -> bool:
        self.on_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.closing:  # a read error: the pipe is as good as gone
            self.on_eof()


class ParentWatch:
    """The child's side: calls ``on_gone(why)`` once, on the loop, when its parent has gone.

    Three signs, any one enough, each catching what another may miss:

    - ``parent_pid``: once a second, whether that process is still this one's parent
      (``os.getppid()``, which no reuse of the pid can fool), or, if it was not the parent
      when the watch started, whether it still exists. A parent already gone when the
      watch starts is reported by ``start()`` itself, before anything is loaded.
    - On Linux, with ``parent_pid`` the parent: ``PR_SET_PDEATHSIG``, so that the kernel
      signals (SIGHUP) the moment the parent dies. The kernel also sends it when only the
      parent's thread that started this process ends; the handler therefore acts only if
      ``os.getppid()`` has changed, and ignores SIGHUP otherwise. It is set after the
      process started, so ``start()`` checks the parent once more after setting it.
    - ``stdin``: EOF on that pipe (``ServerProcess`` holds its write end until it has
      stopped this process), which also comes where the pid is not known.

    ``start()`` must run on the loop, in the main thread for the signal. ``aclose()``
    undoes all three.
    """

    def __init__(
        self,
        on_gone: Callable[[str], None],
        *,
        parent_pid: int | None = None,
        stdin: BinaryIO | None = None,
        poll_s: float = _PARENT_POLL_S,
    ) -> None:
        self.parent_pid = parent_pid
        self.poll_s = poll_s
        self._on_gone = on_gone
        self._stdin = stdin
        self._was_parent = False
        self._gone = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poll: asyncio.Task[None] | None = None
        self._signal_set = False
        self._pipe: asyncio.ReadTransport | None = None
        self._protocol: _EofProtocol | None = None

    @property
    def gone(self) -> bool:
        """Whether a sign that the parent has gone has come."""
        return self._gone

    def parent_alive(self) -> bool:
        """Whether the ``parent_pid`` process is still there (True without one)."""
        pid = self.parent_pid
        if pid is None:
            return True
        return os.getppid() == pid if self._was_parent else _process_exists(pid)

    def _report(self, why: str) -> None:
        if not self._gone and not self._closed:
            self._gone = True
            self._on_gone(why)

    def _check(self, sign: str) -> None:
        if not self.parent_alive():
            self._report(f"the parent process {self.parent_pid} has gone ({sign})")

    async def start(self) -> None:
        """Begin watching; reports at once (before returning) a parent already gone."""
        self._loop = asyncio.get_running_loop()
        if self._stdin is not None:
            await self._watch_stdin(self._stdin)
        pid = self.parent_pid
        if pid is not None:
            self._was_parent = os.getppid() == pid
            if self._was_parent and sys.platform.startswith("linux"):
                self._set_death_signal()
            self._check("before this process started serving")
            if not self._gone:
                self._poll = asyncio.create_task(self._poll_parent(), name="nbllm-parent-watch")

    def _set_death_signal(self) -> None:
        loop = cast("asyncio.AbstractEventLoop", self._loop)
        try:
            loop.add_signal_handler(_PARENT_DEATH_SIGNAL, self._on_death_signal)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            return  # without the handler, a thread's end would kill this process
        if _set_parent_death_signal(_PARENT_DEATH_SIGNAL):
            self._signal_set = True
        else:
            loop.remove_signal_handler(_PARENT_DEATH_SIGNAL)

    def _on_death_signal(self) -> None:
        if self.parent_alive():
            _log.info(
                "%s while the parent process %s runs: the thread of it that started this "
                "process has ended; ignored",
                _PARENT_DEATH_SIGNAL.name,
                self.parent_pid,
            )
        else:
            self._check("a parent-death signal")

    async def _watch_stdin(self, stdin: BinaryIO) -> None:
        loop = cast("asyncio.AbstractEventLoop", self._loop)
        protocol = _EofProtocol(
            lambda: self._report("stdin has reached its end: the parent closed it or has gone")
        )
        try:
            self._pipe, _ = await loop.connect_read_pipe(lambda: protocol, stdin)
        except (ValueError, OSError) as exc:  # a regular file or a closed stream
            _log.warning("cannot watch stdin for its end: %s", exc)
            return
        self._protocol = protocol

    async def _poll_parent(self) -> None:
        while not self._gone:
            await asyncio.sleep(self.poll_s)
            self._check("seen by the periodic check")

    async def aclose(self) -> None:
        """Stop watching (idempotent): no more ``on_gone``, the death signal cleared."""
        self._closed = True
        if self._signal_set:
            self._signal_set = False
            _set_parent_death_signal(0)
            cast("asyncio.AbstractEventLoop", self._loop).remove_signal_handler(
                _PARENT_DEATH_SIGNAL
            )
        if self._pipe is not None and self._protocol is not None:
            self._protocol.closing = True
            self._pipe.close()
            self._pipe = None
        poll, self._poll = self._poll, None
        if poll is not None:
            poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poll
