"""The test server's Anthropic Message Batches routes, in Anthropic's shapes.

``POST /v1/messages/batches`` (``{"requests": [{"custom_id", "params"}]}``),
``GET /v1/messages/batches``, ``GET /v1/messages/batches/{id}``,
``POST /v1/messages/batches/{id}/cancel`` and ``GET /v1/messages/batches/{id}/results``
(JSONL, once the batch has ended). A request's ``params`` (``model``, ``max_tokens``,
``messages``, ``system``: a string or text blocks; contents: a string or text blocks) are
turned into the OpenAI-shaped messages the server answers, so a conversation's history is
checked the same way whichever route carried its earlier turns. Params that cannot be read
so make that request ``errored`` (``invalid_request_error``) when the batch runs, as
Anthropic validates each request's params then. When the server has an ``api_key``, every
route wants it in ``x-api-key``. The batches' lifecycle is ``nbllm.testing.batches``'.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from nbllm.testing.batches import (
    ENDED,
    BatchBook,
    BatchJob,
    BatchLine,
    LineResult,
    listed,
    new_id,
)

__all__ = ["add_routes", "read_params"]

_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, type_: str, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": type_, "message": message}}
    return web.json_response(body, status=status)


def add_routes(app: web.Application, book: BatchBook, api_key: str | None) -> None:
    """Serve ``book``'s Anthropic batches from ``app``."""
    routes = _Routes(book)

    def guarded(handler: _Handler) -> _Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            if api_key is not None and request.headers.get("x-api-key") != api_key:
                return _error(401, "authentication_error", "invalid x-api-key")
            return await handler(request)

        return checked

    app.router.add_post("/v1/messages/batches", guarded(routes.create))
    app.router.add_get("/v1/messages/batches", guarded(routes.list_batches))
    app.router.add_get("/v1/messages/batches/{id}", guarded(routes.batch))
    app.router.add_post("/v1/messages/batches/{id}/cancel", guarded(routes.cancel))
    app.router.add_get("/v1/messages/batches/{id}/results", guarded(routes.results))


def _text(content: Any, where: str) -> str:
    """A string, or the text of a list of text blocks (joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, block in enumerate(content):
            if not (
                isinstance(block, dict)
                and block.get("type") == "text"
                and isinstance(block.get("text"), str)
            ):
                msg = f"{where}.{j}: this server takes text blocks only"
                raise ValueError(msg)
            texts.append(block["text"])
        return "\n".join(texts)
    msg = f"{where}: expected a string or a list of text blocks"
    raise ValueError(msg)


def read_params(params: Any) -> dict[str, Any]:
    """The OpenAI-shaped chat body of an Anthropic request's ``params``; raises
    ``ValueError`` with Anthropic's kind of message for params it does not take."""
    if not isinstance(params, dict):
        msg = "params: expected an object"
        raise ValueError(msg)
    for name in ("model", "max_tokens", "messages"):
        if name not in params:
            msg = f"params.{name}: Field required"
            raise ValueError(msg)
    max_tokens, messages = params["max_tokens"], params["messages"]
    if type(max_tokens) is not int or max_tokens < 1:
        msg = f"params.max_tokens: expected a whole number >= 1, got {max_tokens!r}"
        raise ValueError(msg)
    if not isinstance(params["model"], str) or not isinstance(messages, list) or not messages:
        msg = "params: 'model' must be a string and 'messages' a non-empty list"
        raise ValueError(msg)
    chat: list[dict[str, str]] = []
    if params.get("system") is not None:
        chat.append({"role": "system", "content": _text(params["system"], "params.system")})
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            msg = f"params.messages.{i}.role: expected 'user' or 'assistant'"
            raise ValueError(msg)
        chat.append({"role": role, "content": _text(m.get("content"), f"params.messages.{i}")})
    return {"model": params["model"], "max_tokens": max_tokens, "messages": chat}


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


class _Routes:
    def __init__(self, book: BatchBook) -> None:
        self.book = book

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.content.read())
        except ValueError:
            return _error(400, "invalid_request_error", "The request body is not valid JSON.")
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return _error(400, "invalid_request_error", "requests: expected a non-empty list")
        if (message := self.book.too_many(len(requests))) is not None:
            return _error(400, "invalid_request_error", message)
        lines: list[BatchLine] = []
        seen: set[str] = set()
        for i, item in enumerate(requests):
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
                message = f"requests.{i}.custom_id: expected 1 to 64 of a-z, A-Z, 0-9, _ and -"
                return _error(400, "invalid_request_error", message)
            if custom_id in seen:
                message = f"requests.{i}.custom_id: {custom_id!r} is used more than once"
                return _error(400, "invalid_request_error", message)
            seen.add(custom_id)
            try:
                lines.append(BatchLine(custom_id, read_params(item.get("params"))))
            except ValueError as exc:
                lines.append(BatchLine(custom_id, None, str(exc)))
        job = BatchJob(new_id("msgbatch_"), "anthropic", lines, {})
        self.book.add(job)
        return web.json_response(_batch_json(job, request))

    def _job(self, request: web.Request) -> BatchJob | web.Response:
        batch_id = request.match_info["id"]
        job = self.book.jobs.get(batch_id)
        if job is None or job.api != "anthropic":
            return _error(404, "not_found_error", f"No message batch with id {batch_id!r}")
        return job

    async def batch(self, request: web.Request) -> web.Response:
        job = self._job(request)
        return (
            job if isinstance(job, web.Response) else web.json_response(_batch_json(job, request))
        )

    async def cancel(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if isinstance(job, web.Response):
            return job
        if not self.book.cancel(job):
            message = f"Message batch {job.id} has ended and can no longer be canceled."
            return _error(400, "invalid_request_error", message)
        return web.json_response(_batch_json(job, request))

    async def list_batches(self, request: web.Request) -> web.Response:
        found = listed(self.book, "anthropic", request.query, "after_id", 1000)
        if isinstance(found, str):
            return _error(400, "invalid_request_error", found)
        page = [_batch_json(job, request) for job in found[0]]
        return web.json_response(
            {
                "data": page,
                "has_more": found[1],
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            }
        )

    async def results(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if isinstance(job, web.Response):
            return job
        if job.status not in ENDED:
            message = f"Message batch {job.id} has not ended yet: its results are not ready."
            return _error(400, "invalid_request_error", message)
        lines = [_result_json(r) for r in job.results]
        lines += [
            {"custom_id": line.custom_id, "result": {"type": "canceled"}}
            for line in job.lines[len(job.results) :]
        ]
        text = "".join(json.dumps(line) + "\n" for line in lines)
        return web.Response(text=text, content_type="application/x-jsonl")


def _result_json(result: LineResult) -> dict[str, Any]:
    if result.status == 0:
        return {"custom_id": result.custom_id, "result": {"type": "expired"}}
    body = result.body or {}
    if result.status != 200:
        type_ = "invalid_request_error" if result.status < 500 else "api_error"
        message = str(body.get("error", {}).get("message", "error"))
        error = {"type": "error", "error": {"type": type_, "message": message}}
        return {"custom_id": result.custom_id, "result": {"type": "errored", "error": error}}
    choice = body["choices"][0]
    usage = body.get("usage") or {}
    answer = {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": [{"type": "text", "text": choice["message"]["content"]}],
        "stop_reason": "max_tokens" if choice.get("finish_reason") == "length" else "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": usage.get("prompt_tokens"),
            "output_tokens": usage.get("completion_tokens"),
        },
    }
    return {"custom_id": result.custom_id, "result": {"type": "succeeded", "message": answer}}


def _batch_json(job: BatchJob, request: web.Request) -> dict[str, Any]:
    times, results, n = job.times, job.results, len(job.lines)
    ended = job.status in ENDED
    status = "ended" if ended else "canceling" if job.status == "cancelling" else "in_progress"
    succeeded = sum(r.status == 200 for r in results)
    expired = sum(r.status == 0 for r in results)
    results_url = None
    if ended:
        results_url = f"{request.url.origin()}/v1/messages/batches/{job.id}/results"
    return {
        "id": job.id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": {
            "processing": 0 if ended else n - len(results),
            "succeeded": succeeded,
            "errored": len(results) - succeeded - expired,
            "canceled": n - len(results) if ended else 0,
            "expired": expired,
        },
        "ended_at": _iso(next((times[s] for s in ENDED if s in times), None)),
        "created_at": _iso(times["created"]),
        "expires_at": _iso(times["created"] + 24 * 3600),
        "archived_at": None,
        "cancel_initiated_at": _iso(times.get("cancelling")),
        "results_url": results_url,
    }
