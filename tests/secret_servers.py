"""A careless server for the secrets suite: it answers errors by quoting every header and the
body it received, and records every request.

Real servers do this: a 401 that says ``Incorrect API key provided: Bearer sk-...``, a proxy's
400 that dumps the request, a 500 page with the headers in it. nbllm must keep whatever such a
body quotes out of everything it shows or stores.

The first segment of the path chooses the answer, so one server serves every case:
``echo.url("401")`` is ``http://127.0.0.1:PORT/401/v1``; modes are ``"401"`` (OpenAI-shaped
JSON error), ``"400"`` (plain text), ``"500"`` (JSON error, retryable) and ``"ok"`` (a valid
answer in the shape the path asks for: chat completion, text completion or Gemini).

Import it as ``from secret_servers import EchoServer`` (pytest puts tests/ on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from types import TracebackType

from aiohttp import web

__all__ = ["MODES", "EchoServer", "RecordedRequest"]

MODES = ("401", "400", "500", "ok")
_START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def text(self) -> str:
        """Everything the request carried, as one string to search."""
        lines = [f"{self.method} {self.path}?{self.query}"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        return "\n".join(lines) + "\n" + self.body.decode("utf-8", "replace")

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def _quoted(request: RecordedRequest) -> str:
    """What a careless server says back: every header it got, then the body."""
    headers = "; ".join(f"{name}: {value}" for name, value in request.headers)
    return f"Received headers: {headers}. Received body: {request.body.decode('utf-8', 'replace')}"


def _ok_body(path: str, model: str) -> dict[str, object]:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    if ":generateContent" in path:
        return {
            "candidates": [
                {
                    "content": {"parts": [{"text": "fine"}], "role": "model"},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": 3,
                "candidatesTokenCount": 2,
                "totalTokenCount": 5,
            },
            "modelVersion": model,
        }
    if path.endswith("/completions") and not path.endswith("/chat/completions"):
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 0,
            "model": model,
            "choices": [{"text": "fine", "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": usage,
        }
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "fine"},
                "finish_reason": "stop",
            }
        ],
        "usage": usage,
    }


class EchoServer:
    """The careless server, on a free port of 127.0.0.1, in a thread of its own."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def url(self, mode: str, suffix: str = "/v1") -> str:
        """The ``api_base`` whose requests get the answer of ``mode`` (one of ``MODES``)."""
        assert mode in MODES, mode
        assert self._port is not None, "not started"
        return f"http://127.0.0.1:{self._port}/{mode}{suffix}"

    def all_text(self) -> str:
        return "\n".join(request.text() for request in self.requests)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> EchoServer:
        ready = threading.Event()

        def run() -> None:
            asyncio.run(self._serve(ready))

        self._thread = threading.Thread(target=run, name="nbllm-echo-server", daemon=True)
        self._thread.start()
        if not ready.wait(_START_TIMEOUT_S) or self._port is None:
            msg = "the echo server did not start"
            raise RuntimeError(msg)
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(_START_TIMEOUT_S)
        self._thread = None

    def __enter__(self) -> EchoServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._port = int(runner.addresses[0][1])
            ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    # ----------------------------------------------------------------- answers

    async def _handle(self, request: web.Request) -> web.Response:
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=tuple(request.headers.items()),
            body=await request.read(),
        )
        self.requests.append(recorded)
        mode = request.path.strip("/").split("/", 1)[0]
        quoted = _quoted(recorded)
        if mode == "401":
            auth = (
                recorded.header("Authorization")
                or recorded.header("x-goog-api-key")
                or recorded.header("x-api-key")
            )
            error = {
                "message": f"Incorrect API key provided: {auth}. {quoted}",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
            return web.json_response({"error": error}, status=401)
        if mode == "400":
            return web.Response(status=400, text=f"Bad request. {quoted}")
        if mode == "500":
            error = {"message": f"Internal error. {quoted}", "type": "server_error"}
            return web.json_response({"error": error}, status=500)
        try:
            model = str(json.loads(recorded.body or b"{}").get("model") or "m")
        except (ValueError, AttributeError):
            model = "m"
        return web.json_response(_ok_body(request.path, model))
