"""The ``nbllm serve`` command: its options, and serving until SIGTERM or SIGINT.

::

    nbllm serve --engine torch --model models/Qwen2.5-0.5B-Instruct --port 8000
    # prints: nbllm serve listening on http://127.0.0.1:8000/v1

The key comes from ``--api-key`` or, unseen by ``ps``, from ``$NBLLM_SERVE_API_KEY``.
Without one the command refuses an API engine (it would spend this environment's provider
key for anyone) and a ``--host`` other than loopback (unless ``--insecure-no-key``).
Options are never abbreviated: ``--hos`` is an error, not ``--host``.
The first signal drains (``EngineServer.aclose``); a second cuts the drain short.

A worker's server (``Worker`` passes ``--parent-pid`` and ``--stop-on-stdin-eof``) stops
when its parent goes, killed or not: see ``ParentWatch`` for the signs it watches. Its
clients went with the parent, so it does not drain: it answers what is in flight 503, closes
the engine and exits 0, as after a signal; a parent already gone when it starts makes it exit
0 before it listens or loads anything. If that stop takes more than
``PARENT_GONE_EXIT_S`` (an engine that does not let go), the process exits at once with
code 1: no model outlives its user.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import ipaddress
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from nbllm.engines import EMBEDDED_MODEL, create_engine, is_local
from nbllm.engines.base import Engine
from nbllm.engines.child_process import ParentWatch
from nbllm.engines.fake import FakeEngine, echo
from nbllm.engines.openai_wire import (
    SERVE_API_KEY_ENV,
    SERVE_URL_LINE_PREFIX,
    ignore_stop_signals,
    on_stop_signals,
)
from nbllm.errors import ConfigError
from nbllm.serve.server import DEFAULT_MAX_BODY_MB, EngineServer

__all__ = [
    "PARENT_GONE_EXIT_S",
    "add_parser",
    "check_exposure",
    "engine_factory",
    "main",
    "serve_until_signal",
]

_log = logging.getLogger("nbllm.serve")

#: Seconds a server whose parent has gone may take to stop before it exits regardless.
PARENT_GONE_EXIT_S = 5.0
# The exit code of a stop that ran past PARENT_GONE_EXIT_S.
_FORCED_EXIT_CODE = 1


def _load_fake_engine(latency: float, load_s: float) -> Engine:
    time.sleep(load_s)  # in the load thread: simulates a slow model load
    return FakeEngine(echo, latency=latency)


def engine_factory(args: argparse.Namespace) -> Callable[[], Engine]:
    """What builds the engine the command's options name (called later, in a thread)."""
    if args.engine == "fake":
        return functools.partial(_load_fake_engine, args.fake_latency, args.fake_load_s)
    options: dict[str, Any] = {}
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    if args.batch_wait_ms is not None:
        options["batch_wait_s"] = args.batch_wait_ms / 1000
    if args.device is not None:
        options["device"] = args.device
    if not args.prefix_cache:
        options["prefix_cache"] = False
    if args.prefix_cache_bytes is not None:
        options["prefix_cache_bytes"] = args.prefix_cache_bytes
    # worker=False: this process is the worker; it must not start another one.
    return functools.partial(create_engine, args.engine, model=args.model, worker=False, **options)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:  # also refuses nan
        msg = f"expected a number >= 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        msg = f"expected a whole number >= 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"expected an integer >= 1, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_float(text: str) -> float:
    value = _non_negative(text)
    if value == 0 or math.isinf(value):
        msg = f"expected a finite number > 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to any address
        return False


def check_exposure(
    engine: str, model: str | None, host: str, api_key: str | None, *, insecure_no_key: bool
) -> None:
    """Refuse to serve what anyone could spend: raises ``ConfigError`` before anything starts.

    An API engine (``openai``, ``litellm``, ``auto`` for a non-local model) spends the
    provider key of this process's environment for each caller, so it needs a key even on
    loopback, where every user of the machine can reach it. A local model on a host other
    than loopback needs a key unless ``insecure_no_key``.
    """
    if api_key:
        return
    if engine != "fake" and not is_local(engine, model, None):
        msg = (
            f"--engine {engine}: an API engine spends this environment's provider key for "
            f"every caller; set ${SERVE_API_KEY_ENV} (or --api-key) to serve it"
        )
        raise ConfigError(msg)
    if not _is_loopback(host) and not insecure_no_key:
        msg = (
            f"--host {host} is reachable from other machines; set ${SERVE_API_KEY_ENV} "
            "(or --api-key), or pass --insecure-no-key to serve it to anyone"
        )
        raise ConfigError(msg)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` command to the ``nbllm`` command's subparsers."""
    serve = subparsers.add_parser(
        "serve",
        # "--hos 0.0.0.0" or "--api-k KEY" must not slip past a check of option names.
        allow_abbrev=False,
        help="serve one model over an OpenAI-compatible HTTP API",
        description=(
            "Serve one engine over an OpenAI-compatible HTTP API (/v1/chat/completions, "
            "/v1/models, /health, /ready). Prints one line, 'nbllm serve listening on URL', "
            "to stdout. SIGTERM or SIGINT drains: requests in flight are still answered."
        ),
    )
    serve.add_argument("--engine", default="auto", help="which engine (default: auto)")
    serve.add_argument(
        "--model",
        help="the model to load or send to (default for a local engine: the embedded one)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="(default: 8000; 0: a free port)")
    serve.add_argument(
        "--max-queue",
        type=_positive_int,
        default=256,
        metavar="N",
        help="requests admitted at once; one more gets 429 (default: 256)",
    )
    serve.add_argument(
        "--api-key",
        metavar="KEY",
        help=(
            f"require this Bearer key on /v1/ (better: set ${SERVE_API_KEY_ENV}: an option "
            "is visible to other users in ps); needed for an API engine (openai, litellm) "
            "and for a --host other than loopback"
        ),
    )
    serve.add_argument(
        "--insecure-no-key",
        action="store_true",
        help="allow a --host other than loopback without a key (anyone who reaches it may use it)",
    )
    serve.add_argument(
        "--max-body-mb",
        type=_positive_float,
        default=DEFAULT_MAX_BODY_MB,
        metavar="MB",
        help=f"a larger request body gets 413, unread (default: {DEFAULT_MAX_BODY_MB:g})",
    )
    serve.add_argument(
        "--grace",
        type=_non_negative,
        default=30.0,
        metavar="S",
        help="seconds to finish requests in flight on shutdown (default: 30)",
    )
    serve.add_argument("--served-model-name", metavar="NAME", help="the model name answers report")
    serve.add_argument("--batch-size", type=_positive_int, metavar="N", help="for local engines")
    serve.add_argument(
        "--batch-wait-ms", type=_non_negative, metavar="MS", help="for local engines"
    )
    serve.add_argument("--device", help="for local engines, e.g. cpu, cuda, cuda:1")
    serve.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_false",
        help="for local engines: compute every prompt whole, reusing no earlier prompt's keys",
    )
    serve.add_argument(
        "--prefix-cache-bytes",
        type=_whole_number,
        metavar="BYTES",
        help="for local engines: the prefix cache's bound (default: a fifth of free memory)",
    )
    serve.add_argument(
        "--metrics-port",
        type=_positive_int,
        metavar="PORT",
        help="serve Prometheus metrics on /metrics at this port: the queue, batch sizes, "
        "tokens generated (needs nbllm[metrics])",
    )
    serve.add_argument(
        "--metrics-host", default="127.0.0.1", metavar="HOST", help="(default: 127.0.0.1)"
    )
    serve.add_argument(
        "--fake-latency",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="--engine fake: seconds per answer (for tests)",
    )
    serve.add_argument(
        "--fake-load-s",
        type=_non_negative,
        default=0.0,
        metavar="S",
        help="--engine fake: seconds the load takes (for tests)",
    )
    serve.add_argument(
        "--parent-pid",
        type=_positive_int,
        metavar="PID",
        help=(
            "stop once process PID has exited, killed or not (checked every second, and at "
            "once on Linux where PID is this server's parent); requests in flight are cut off"
        ),
    )
    serve.add_argument(
        "--stop-on-stdin-eof",
        action="store_true",
        help="stop like --parent-pid once stdin (a pipe the parent holds open) reaches its end",
    )
    serve.set_defaults(handler=main)
    return serve


def _exit_after(seconds: float) -> None:
    """Exit the process in ``seconds`` unless it has exited by then (a daemon timer)."""

    def exit_now() -> None:
        _log.error("still stopping after %g s; exiting now", seconds)
        logging.shutdown()
        os._exit(_FORCED_EXIT_CODE)

    timer = threading.Timer(seconds, exit_now)
    timer.name = "nbllm-serve-exit"
    timer.daemon = True
    timer.start()


async def serve_until_signal(
    server: EngineServer,
    *,
    parent_pid: int | None = None,
    stdin: BinaryIO | None = None,
    exit_deadline_s: float | None = None,
) -> bool:
    """Start ``server``, print the URL line, wait for SIGTERM or SIGINT, then drain.

    For a process that serves in the foreground: it takes over both signals, and ignores
    them once drained. A second signal during the drain cuts off the requests still running
    (answered 503).

    ``parent_pid`` and ``stdin`` tie the server to its parent (``ParentWatch``): once it has
    gone the server stops without a drain, and if ``exit_deadline_s`` is given, the process
    exits (code 1) where that stop takes longer. Returns whether the parent has gone.
    """
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            server.cut_off()
        stop.set()

    def on_parent_gone(why: str) -> None:
        _log.info("%s: stopping; requests in flight are cut off", why)
        # Their clients were the parent's: nobody is left to read the answers.
        server.grace = 0.0
        server.cut_off()
        stop.set()
        if exit_deadline_s is not None:
            _exit_after(exit_deadline_s)

    on_stop_signals(on_signal)
    watch = ParentWatch(on_parent_gone, parent_pid=parent_pid, stdin=stdin)
    try:
        await watch.start()
        if not stop.is_set():  # the parent may have gone before this process started
            await server.start()
            try:
                print(f"{SERVE_URL_LINE_PREFIX}{server.url}", flush=True)
            except BrokenPipeError:  # nobody reads the line: the parent has gone
                on_parent_gone("stdout is closed")
            await stop.wait()
        _log.info("stopping")
    finally:
        await watch.aclose()
        await server.aclose()
        # Once drained the process only exits: a late SIGTERM must not turn exit 0 into a kill.
        ignore_stop_signals()
    return watch.gone


def _stdin_pipe() -> BinaryIO | None:
    """This process's stdin, to watch for its end; None where there is none."""
    try:
        # closefd=False: when the watch closes it, fd 0 stays with the interpreter.
        return open(0, "rb", buffering=0, closefd=False)
    except OSError as exc:
        _log.warning("--stop-on-stdin-eof: stdin cannot be opened (%s)", exc)
        return None


def main(args: argparse.Namespace) -> int:
    """Run ``nbllm serve`` with parsed options until a signal; returns the exit code."""
    api_key = args.api_key or os.environ.get(SERVE_API_KEY_ENV) or None
    check_exposure(
        args.engine, args.model, args.host, api_key, insecure_no_key=args.insecure_no_key
    )
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="nbllm serve: %(message)s")
    # Without --model a local engine loads the embedded model (create_engine's rule).
    model = args.model or ("fake" if args.engine == "fake" else EMBEDDED_MODEL)
    server = EngineServer(
        engine_factory(args),
        model=model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        max_queue=args.max_queue,
        api_key=api_key,
        grace=args.grace,
        max_body_mb=args.max_body_mb,
        # A local model's messages hold no provider text (nor its keys): worth relaying.
        relay_errors=args.engine == "fake" or is_local(args.engine, args.model, None),
    )
    if args.metrics_port is not None:  # before listening: a port in use stops here
        from nbllm.metrics import serve_metrics

        serve_metrics(server, args.metrics_port, args.metrics_host)
    serving = serve_until_signal(
        server,
        parent_pid=args.parent_pid,
        stdin=_stdin_pipe() if args.stop_on_stdin_eof else None,
        exit_deadline_s=PARENT_GONE_EXIT_S,
    )
    asyncio.run(serving)
    return 0
