"""``python -m nbllm.testing``: the test server in the foreground, for benchmarks and demos.

It prints exactly one line, ``nbllm test server listening on URL``, once it listens, so a parent
process can read the URL; SIGINT/SIGTERM stop it gracefully. With ``--parent-pid PID`` (what
``start_subprocess`` passes) it also stops when that process has gone, ``kill -9`` included,
so that a killed test run or benchmark leaves no server behind.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from nbllm.engines.child_process import ParentWatch
from nbllm.engines.openai_wire import on_stop_signals
from nbllm.errors import ConfigError
from nbllm.testing.launcher import URL_LINE_PREFIX
from nbllm.testing.options import Fault
from nbllm.testing.server import TestServer


def _latency(text: str) -> float | tuple[float, float]:
    """``S`` for a fixed latency, ``LOW,HIGH`` for a uniform random one."""
    parts = [float(x) for x in text.split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    msg = f"expected S or LOW,HIGH, got {text!r}"
    raise argparse.ArgumentTypeError(msg)


def _fault_rate(text: str) -> tuple[Fault, float]:
    """``KIND=P`` with KIND one of server_error, unavailable, drop, hang."""
    kind, sep, p = text.partition("=")
    if not sep:
        msg = f"expected KIND=P, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    try:
        return Fault.parse(kind), float(p)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nbllm.testing",
        description="Run the nbllm OpenAI-compatible test server in the foreground.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: a free one)")
    parser.add_argument("--latency", type=_latency, default=0.0, help="seconds: S or LOW,HIGH")
    parser.add_argument(
        "--latency-sigma", type=float, default=0.0, help="> 0: lognormal, median --latency"
    )
    parser.add_argument("--rpm", type=int, default=None, help="accepted requests per window")
    parser.add_argument("--window-s", type=float, default=60.0, help="rate-limit window")
    parser.add_argument(
        "--fault-rate",
        type=_fault_rate,
        action="append",
        default=[],
        metavar="KIND=P",
        help="fault probability per request; KIND: server_error, unavailable, drop, hang",
    )
    parser.add_argument(
        "--fault-first", type=int, default=None, help="fail each distinct request's first N tries"
    )
    parser.add_argument("--hang-s", type=float, default=30.0, help="how long a hang lasts")
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed for faults and latency")
    parser.add_argument("--api-key", default=None, help="require this Bearer key")
    parser.add_argument("--log", default=None, metavar="FILE.jsonl", help="append a request log")
    parser.add_argument(
        "--bad-json-first", type=int, default=0, help="the first N JSON answers are not JSON"
    )
    parser.add_argument(
        "--shared-history",
        action="store_true",
        help="accept earlier answers any server of this model would give (a group of servers)",
    )
    parser.add_argument(
        "--prompt-cache",
        action="store_true",
        help="say the prompt tokens of each request's start an earlier request had",
    )
    parser.add_argument(
        "--batch-delay", type=float, default=0.2, help="seconds from a batch's creation to its end"
    )
    parser.add_argument(
        "--batch-max-requests", type=int, default=None, help="the most requests in one batch"
    )
    parser.add_argument(
        "--batch-fail-first", type=int, default=0, help="the first N batch lines get a 500"
    )
    parser.add_argument(
        "--batch-expire-first", type=int, default=0, help="the first N batches expire half-run"
    )
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="stop when this process has gone"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    faults: dict[Fault, float] = {}
    for kind, p in args.fault_rate:
        faults[kind] = faults.get(kind, 0.0) + p
    try:
        server = TestServer(
            latency=args.latency,
            rpm=args.rpm,
            window_s=args.window_s,
            faults=faults or None,
            fault_first=args.fault_first,
            hang_s=args.hang_s,
            retry_after=args.retry_after,
            seed=args.seed,
            api_key=args.api_key,
            host=args.host,
            port=args.port,
            log_path=args.log,
            shared_history=args.shared_history,
            bad_json_first=args.bad_json_first,
            latency_sigma=args.latency_sigma,
            prompt_cache=args.prompt_cache,
            batch_delay_s=args.batch_delay,
            batch_max_requests=args.batch_max_requests,
            batch_fail_first=args.batch_fail_first,
            batch_expire_first=args.batch_expire_first,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        watch = ParentWatch(lambda why: server._request_stop(), parent_pid=args.parent_pid)

        def on_ready() -> None:
            on_stop_signals(server._request_stop)
            if watch.gone:  # went while the server was starting: no stop event to set yet
                server._request_stop()
                return
            print(f"{URL_LINE_PREFIX}{server.url}", flush=True)

        await watch.start()
        if watch.gone:
            return
        try:
            await server._serve(on_ready)
        finally:
            await watch.aclose()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:  # a SIGINT before the handlers were installed
        return 130
    except OSError as exc:  # e.g. the port is taken: one clear line for start_subprocess()
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
