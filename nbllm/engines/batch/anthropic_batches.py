"""Anthropic's Message Batches API (``/v1/messages/batches``), spoken directly over HTTP.

A batch is created with its requests in the body (``{"custom_id", "params"}``, params as
for ``/v1/messages``); once its ``processing_status`` is ``ended`` its results are a JSONL
file at ``results_url``. Anthropic's statuses become OpenAI's words in ``BatchInfo``
(in_progress, cancelling, then completed, expired or cancelled). A chat request becomes
Anthropic's shape here: system messages go to ``system``, ``max_tokens`` is required
(``DEFAULT_MAX_TOKENS`` where the run sets none), and a ``response_format`` is asked for
in the system prompt (Anthropic has no such field; ``local.base.json_instruction``). The
run's parser checks the answer as it does any other.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from nbllm.engines.batch.http import BatchClient, number
from nbllm.engines.batch.lines import BatchInfo
from nbllm.engines.http_status import error_for_status
from nbllm.engines.local.base import json_instruction
from nbllm.errors import EngineError, RequestTimeout, ServerError
from nbllm.images import content_text
from nbllm.types import ChatRequest, ChatResponse

__all__ = ["AnthropicBatches"]

VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
_STOP = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}
# Sampling parameters Anthropic takes as they are; others are not sent.
_SAME = ("temperature", "top_p", "top_k", "metadata")


class AnthropicBatches(BatchClient):
    """Anthropic's Message Batches at ``api_base`` (``https://api.anthropic.com/v1``)."""

    api = "anthropic"
    max_requests = 100_000
    max_bytes = 256 * 1024 * 1024

    def __init__(self, api_base: str | None, api_key: str | None) -> None:
        headers = {"anthropic-version": VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        super().__init__(api_base or "https://api.anthropic.com/v1", headers, api_key)

    def body(self, request: ChatRequest) -> dict[str, Any]:
        params = dict(request.params)
        system = [content_text(m["content"]) for m in request.messages if m["role"] == "system"]
        if params.get("response_format") is not None:  # asked in the system prompt, which
            system.append(json_instruction(params["response_format"]))  # no later turn repeats
        body: dict[str, Any] = {
            "model": request.model.removeprefix("anthropic/"),
            "max_tokens": params.get("max_tokens") or DEFAULT_MAX_TOKENS,
            "messages": [_message(m) for m in request.messages if m["role"] != "system"],
        }
        if system:
            body["system"] = "\n\n".join(system)
        body.update({k: params[k] for k in _SAME if k in params})
        stop = params.get("stop")
        if stop:
            body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
        return body

    def line(self, custom_id: str, body: Mapping[str, Any]) -> bytes:
        return json.dumps({"custom_id": custom_id, "params": body}, ensure_ascii=False).encode()

    async def create(self, lines: list[bytes]) -> BatchInfo:
        # The lines are JSON already: joined, not parsed and written again.
        raw = b'{"requests":[' + b",".join(lines) + b"]}"
        created = await self.call_json(
            "POST", "/messages/batches", data=raw, content_type="application/json"
        )
        return _info(created)

    async def retrieve(self, batch_id: str) -> BatchInfo:
        return _info(await self.call_json("GET", f"/messages/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> BatchInfo:
        return _info(await self.call_json("POST", f"/messages/batches/{batch_id}/cancel"))

    async def results(self, info: BatchInfo) -> dict[str, ChatResponse | EngineError]:
        raw = await self.call("GET", f"/messages/batches/{info.id}/results")
        out: dict[str, ChatResponse | EngineError] = {}
        for text in raw.splitlines():
            if text.strip():
                line = json.loads(text)
                out[str(line.get("custom_id"))] = _result(line.get("result"), info.id)
        return out


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    content = message["content"]
    if not isinstance(content, str):
        content = [_part(p) for p in content]
    return {"role": message["role"], "content": content}


def _part(part: Mapping[str, Any]) -> dict[str, Any]:
    if part.get("type") == "image_url":
        url = str(part["image_url"]["url"])
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            media = head.removeprefix("data:").split(";")[0]
            source = {"type": "base64", "media_type": media, "data": data}
            return {"type": "image", "source": source}
        return {"type": "image", "source": {"type": "url", "url": url}}
    return {"type": "text", "text": str(part.get("text", ""))}


def _seconds(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _info(payload: dict[str, Any]) -> BatchInfo:
    batch_id = payload.get("id")
    if not isinstance(batch_id, str):
        msg = f"a message batch without an id: {str(payload)[:200]}"
        raise EngineError(msg)
    counts = payload.get("request_counts")
    counts = counts if isinstance(counts, dict) else {}
    succeeded = number(counts.get("succeeded"))
    errored, expired = number(counts.get("errored")), number(counts.get("expired"))
    canceled = number(counts.get("canceled"))
    total = succeeded + errored + expired + canceled + number(counts.get("processing"))
    state = payload.get("processing_status")
    if state == "ended":
        status = "cancelled" if payload.get("cancel_initiated_at") else "completed"
        status = "expired" if expired and status == "completed" else status
    else:
        status = "cancelling" if state == "canceling" else "in_progress"
    return BatchInfo(
        id=batch_id,
        status=status,
        total=total,
        completed=succeeded,
        failed=errored + expired + canceled,
        created_at=_seconds(payload.get("created_at")),
        expires_at=_seconds(payload.get("expires_at")),
    )


def _result(result: Any, batch_id: str) -> ChatResponse | EngineError:
    kind = result.get("type") if isinstance(result, dict) else None
    if kind == "succeeded":
        message = result["message"]
        usage = message.get("usage") or {}
        text = "".join(
            b.get("text", "") for b in message.get("content") or () if b.get("type") == "text"
        )
        cached = usage.get("cache_read_input_tokens")
        return ChatResponse(
            text=text,
            model=str(message.get("model") or ""),
            # Anthropic counts cached and cache-written prompt tokens apart from the rest.
            prompt_tokens=number(usage.get("input_tokens"))
            + number(cached)
            + number(usage.get("cache_creation_input_tokens")),
            completion_tokens=usage.get("output_tokens"),
            finish_reason=_STOP.get(message.get("stop_reason"), message.get("stop_reason")),
            cached_tokens=cached if isinstance(cached, int) else None,
        )
    if kind == "expired":
        return RequestTimeout(f"batch {batch_id} expired before this request was answered")
    if kind == "canceled":
        return ServerError(f"batch {batch_id} was cancelled before this request was answered")
    error = result.get("error") if isinstance(result, dict) else None
    inner = error.get("error", error) if isinstance(error, dict) else {}
    inner = inner if isinstance(inner, dict) else {}
    status = 400 if inner.get("type") == "invalid_request_error" else 500
    return error_for_status(status, f"in batch {batch_id}: {inner.get('message') or result}")
