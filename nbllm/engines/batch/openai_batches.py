"""OpenAI's Batch API (``/v1/files`` + ``/v1/batches``), for OpenAI and any server that
serves those endpoints beside ``/v1/chat/completions``.

A batch is a JSONL file of ``{"custom_id", "method": "POST", "url":
"/v1/chat/completions", "body"}`` lines, uploaded with ``purpose="batch"`` and named by
``POST /v1/batches``. Once it has ended its answers are in the output file and its failed
lines in the error file (an expired batch's unanswered lines there too, with the code
``batch_expired``); both files are read and then deleted with the input file.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any

import aiohttp

from nbllm.engines.batch.http import BatchClient, number
from nbllm.engines.batch.lines import BatchInfo
from nbllm.engines.http_status import error_for_status
from nbllm.engines.openai_wire import chat_body, completion_of
from nbllm.errors import EngineError, RequestTimeout
from nbllm.types import ChatRequest, ChatResponse

__all__ = ["OpenAIBatches"]

ENDPOINT = "/v1/chat/completions"
WINDOW = "24h"
#: The error code of a line an expired batch left unanswered.
_EXPIRED = "batch_expired"


class OpenAIBatches(BatchClient):
    """OpenAI's batch API at ``api_base`` (``https://api.openai.com/v1`` or a server's)."""

    api = "openai"
    max_requests = 50_000
    max_bytes = 200 * 1024 * 1024

    def __init__(self, api_base: str | None, api_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        super().__init__(api_base or "https://api.openai.com/v1", headers, api_key)

    def body(self, request: ChatRequest) -> dict[str, Any]:
        return chat_body(request)  # without extra_headers: a line has no headers of its own

    def line(self, custom_id: str, body: Mapping[str, Any]) -> bytes:
        line = {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}
        return json.dumps(line, ensure_ascii=False).encode()

    async def create(self, lines: list[bytes]) -> BatchInfo:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field(
            "file", b"\n".join(lines) + b"\n", filename="nbllm-batch.jsonl",
            content_type="application/jsonl",
        )  # fmt: skip
        uploaded = await self.call_json("POST", "/files", data=form)
        file_id = uploaded.get("id")
        if not isinstance(file_id, str):
            msg = f"{self.where}/files answered an upload without a file id"
            raise EngineError(msg)
        payload = {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": WINDOW}
        return _info(await self.call_json("POST", "/batches", payload=payload))

    async def retrieve(self, batch_id: str) -> BatchInfo:
        return _info(await self.call_json("GET", f"/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> BatchInfo:
        return _info(await self.call_json("POST", f"/batches/{batch_id}/cancel"))

    async def results(self, info: BatchInfo) -> dict[str, ChatResponse | EngineError]:
        out: dict[str, ChatResponse | EngineError] = {}
        for file_id in (info.output_file_id, info.error_file_id):
            if file_id:
                raw = await self.call("GET", f"/files/{file_id}/content")
                for text in raw.splitlines():
                    if text.strip():
                        custom_id, result = _result(json.loads(text), info.id)
                        out[custom_id] = result
        for file_id in (info.input_file_id, info.output_file_id, info.error_file_id):
            if file_id:  # read: no reason to keep prompts and answers at the provider
                with contextlib.suppress(EngineError):
                    await self.call("DELETE", f"/files/{file_id}")
        return out


def _info(payload: dict[str, Any]) -> BatchInfo:
    counts = payload.get("request_counts")
    counts = counts if isinstance(counts, dict) else {}
    errors = payload.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    error = None
    if isinstance(data, list) and data:
        parts = []
        for item in data[:3]:
            if isinstance(item, dict):
                where = f" (line {item['line']})" if item.get("line") is not None else ""
                parts.append(f"{item.get('code') or 'error'}: {item.get('message')}{where}")
        error = "; ".join(parts) or None
    batch_id = payload.get("id")
    if not isinstance(batch_id, str):
        msg = f"a batch without an id: {str(payload)[:200]}"
        raise EngineError(msg)

    def when(key: str) -> float | None:
        value = payload.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    return BatchInfo(
        id=batch_id,
        status=str(payload.get("status") or "validating"),
        total=number(counts.get("total")),
        completed=number(counts.get("completed")),
        failed=number(counts.get("failed")),
        created_at=when("created_at"),
        expires_at=when("expires_at"),
        input_file_id=payload.get("input_file_id"),
        output_file_id=payload.get("output_file_id"),
        error_file_id=payload.get("error_file_id"),
        error=error,
    )


def _result(line: dict[str, Any], batch_id: str) -> tuple[str, ChatResponse | EngineError]:
    custom_id = str(line.get("custom_id"))
    response = line.get("response")
    error = line.get("error")
    if isinstance(response, dict) and response.get("status_code") == 200:
        body = response.get("body")
        try:
            return custom_id, completion_of(body, "")
        except ValueError:
            return custom_id, EngineError(f"batch {batch_id}: a line answered {str(body)[:200]}")
    if isinstance(error, dict) and error.get("code") == _EXPIRED:
        msg = f"batch {batch_id} expired before this request was answered"
        return custom_id, RequestTimeout(msg)
    if isinstance(response, dict):
        body = response.get("body")
        status = number(response.get("status_code")) or 500
        detail = body.get("error", body) if isinstance(body, dict) else body
        message = detail.get("message") if isinstance(detail, dict) else detail
        return custom_id, error_for_status(status, f"in batch {batch_id}: {message}")
    message = error.get("message") if isinstance(error, dict) else error
    return custom_id, error_for_status(500, f"in batch {batch_id}: {message}")
