"""The test server's OpenAI Files and Batch routes, in OpenAI's shapes.

``POST /v1/files`` (multipart: ``purpose``, ``file``), ``GET /v1/files/{id}``,
``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``; ``POST /v1/batches``,
``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``, ``GET /v1/batches``. Each line
of a batch's input file is ``{"custom_id", "method": "POST", "url", "body"}``; a file with a
bad line fails the batch at creation with OpenAI's per-line ``errors``. When the batch ends
its answers are in its output file and its failed and expired lines in its error file,
each as OpenAI writes them. When the server has an ``api_key``, every route wants it as a
Bearer token. The batches' lifecycle is ``nbllm.testing.batches``'.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import BodyPartReader, web

from nbllm.engines.openai_wire import error_body
from nbllm.testing.batches import BatchBook, BatchJob, BatchLine, StoredFile, listed, new_id

__all__ = ["add_routes", "unauthorized"]

ENDPOINT = "/v1/chat/completions"
WINDOW = "24h"
_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
_MISSING = "Missing required parameter: '{}'."
_EXPIRED = "This request could not be executed before the completion window expired."
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(status: int, payload: Any) -> web.Response:
    return web.json_response(payload, status=status)


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    type_ = "invalid_request_error" if status < 500 else "server_error"
    body = error_body(message, type_)
    body["error"]["param"] = param
    return _json(status, body)


def unauthorized() -> web.Response:
    body = error_body(
        "Incorrect or missing API key for the nbllm test server.",
        "invalid_request_error",
        "invalid_api_key",
    )
    return _json(401, body)


def add_routes(app: web.Application, book: BatchBook, api_key: str | None) -> None:
    """Serve ``book``'s files and OpenAI batches from ``app``."""
    routes = _Routes(book)
    auth = None if api_key is None else f"Bearer {api_key}"

    def guarded(handler: _Handler) -> _Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            if auth is not None and request.headers.get("Authorization") != auth:
                return unauthorized()
            return await handler(request)

        return checked

    app.router.add_post("/v1/files", guarded(routes.upload))
    app.router.add_get("/v1/files/{id}", guarded(routes.file))
    app.router.add_get("/v1/files/{id}/content", guarded(routes.content))
    app.router.add_delete("/v1/files/{id}", guarded(routes.delete_file))
    app.router.add_post("/v1/batches", guarded(routes.create))
    app.router.add_get("/v1/batches", guarded(routes.list_batches))
    app.router.add_get("/v1/batches/{id}", guarded(routes.batch))
    app.router.add_post("/v1/batches/{id}/cancel", guarded(routes.cancel))


class _Routes:
    def __init__(self, book: BatchBook) -> None:
        self.book = book

    # ------------------------------------------------------------------- files

    async def upload(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            return _error(400, "The request must be multipart/form-data.")
        purpose: str | None = None
        filename, data = None, b""
        # Read part by part: batch files may be far larger than a chat request body.
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename, data = part.filename or "file", bytes(await part.read())
        if purpose is None:
            return _error(400, "Missing required parameter: 'purpose'.", "purpose")
        if filename is None:
            return _error(400, "Missing required parameter: 'file'.", "file")
        if purpose not in _PURPOSES:
            return _error(400, f"Invalid value for 'purpose': {purpose!r}.", "purpose")
        stored = StoredFile(new_id("file-"), filename, purpose, data, int(time.time()))
        self.book.files[stored.id] = stored
        self.book.counts["files_uploaded"] += 1
        return _json(200, stored.to_json())

    def _file(self, request: web.Request) -> StoredFile | web.Response:
        file_id = request.match_info["id"]
        stored = self.book.files.get(file_id)
        return stored or _error(404, f"No such File object: {file_id}", "id")

    async def file(self, request: web.Request) -> web.Response:
        stored = self._file(request)
        return stored if isinstance(stored, web.Response) else _json(200, stored.to_json())

    async def content(self, request: web.Request) -> web.Response:
        stored = self._file(request)
        if isinstance(stored, web.Response):
            return stored
        return web.Response(body=stored.data, content_type="application/octet-stream")

    async def delete_file(self, request: web.Request) -> web.Response:
        stored = self._file(request)
        if isinstance(stored, web.Response):
            return stored
        del self.book.files[stored.id]
        return _json(200, {"id": stored.id, "object": "file", "deleted": True})

    # ------------------------------------------------------------------- batches

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.content.read())
        except ValueError:
            return _error(400, "The request body is not valid JSON.")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                return _error(400, f"Missing required parameter: '{name}'.", name)
        if body["endpoint"] != ENDPOINT:
            message = f"Invalid value for 'endpoint': this server runs only {ENDPOINT} batches."
            return _error(400, message, "endpoint")
        if body["completion_window"] != WINDOW:
            message = f"Invalid value for 'completion_window': only {WINDOW!r} is supported."
            return _error(400, message, "completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            return _error(400, "Invalid type for 'metadata': expected an object.", "metadata")
        stored = self.book.files.get(body["input_file_id"])
        if stored is None:
            return _error(404, f"No such File object: {body['input_file_id']}", "input_file_id")
        if stored.purpose != "batch":
            message = f"The input file must have purpose 'batch', not {stored.purpose!r}."
            return _error(400, message, "input_file_id")
        lines, errors = _read_lines(stored.data)
        info = {"input_file_id": stored.id, "metadata": metadata}
        job = BatchJob(new_id("batch_"), "openai", lines, info)
        job.on_end = self._write_outputs
        if not errors and (too_many := self.book.too_many(len(lines))) is not None:
            errors = [_line_error("too_many_requests", too_many, None)]
        if errors:
            self.book.fail(job, errors)
        self.book.add(job)
        return _json(200, _batch_json(job))

    def _job(self, request: web.Request) -> BatchJob | web.Response:
        batch_id = request.match_info["id"]
        job = self.book.jobs.get(batch_id)
        if job is None or job.api != "openai":
            return _error(404, f"No such Batch object: {batch_id}", "id")
        return job

    async def batch(self, request: web.Request) -> web.Response:
        job = self._job(request)
        return job if isinstance(job, web.Response) else _json(200, _batch_json(job))

    async def cancel(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if isinstance(job, web.Response):
            return job
        if not self.book.cancel(job):
            return _error(400, f"Cannot cancel a batch with status '{job.status}'.")
        return _json(200, _batch_json(job))

    async def list_batches(self, request: web.Request) -> web.Response:
        found = listed(self.book, "openai", request.query, "after", 100)
        if isinstance(found, str):
            return _error(400, found, "limit")
        page = [_batch_json(job) for job in found[0]]
        return _json(
            200,
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": found[1],
            },
        )

    def _write_outputs(self, job: BatchJob) -> None:
        """The output and error files of an ended batch, null where one would be empty."""
        answered: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for result in job.results:
            line: dict[str, Any] = {"id": new_id("batch_req_"), "custom_id": result.custom_id}
            if result.status == 0:
                line.update(response=None, error={"code": "batch_expired", "message": _EXPIRED})
            else:
                response = {"status_code": result.status, "request_id": result.request_id}
                line.update(response={**response, "body": result.body}, error=None)
            (answered if result.status == 200 else failed).append(line)
        for name, lines in (("output", answered), ("error", failed)):
            if not lines:
                job.info[f"{name}_file_id"] = None
                continue
            data = "".join(json.dumps(line) + "\n" for line in lines).encode()
            filename = f"{job.id}_{name}.jsonl"
            stored = StoredFile(new_id("file-"), filename, "batch_output", data, int(time.time()))
            self.book.files[stored.id] = stored
            job.info[f"{name}_file_id"] = stored.id


def _line_error(
    code: str, message: str, line: int | None, param: str | None = None
) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _read_lines(data: bytes) -> tuple[list[BatchLine], list[dict[str, Any]]]:
    """The lines of a batch input file, and OpenAI's errors for those that are not valid."""
    lines: list[BatchLine] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [], [_line_error("invalid_file_format", "The file is not UTF-8 text.", None)]
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError:
            item = None
        if not isinstance(item, dict):
            message = "This line is not parseable as valid JSON."
            errors.append(_line_error("invalid_json_line", message, number))
            continue
        problem = _line_problem(item, seen, models)
        if problem is not None:
            errors.append(_line_error(*problem[:2], number, problem[2]))
            continue
        seen.add(item["custom_id"])
        models.add(item["body"]["model"])
        lines.append(BatchLine(item["custom_id"], item["body"]))
    if not lines and not errors:
        errors.append(_line_error("empty_file", "The batch input file is empty.", None))
    return lines, errors


def _line_problem(
    item: dict[str, Any], seen: set[str], models: set[str]
) -> tuple[str, str, str] | None:
    """OpenAI's error code, message and param for a line it would refuse; None if valid."""
    custom_id, body = item.get("custom_id"), item.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        return ("missing_required_parameter", _MISSING.format("custom_id"), "custom_id")
    if custom_id in seen:
        message = (
            "The custom_id for this request is a duplicate of another request. The "
            "custom_id parameter must be unique for each request in a batch."
        )
        return ("duplicate_custom_id", message, "custom_id")
    if item.get("method") != "POST":
        return ("invalid_method", "The method of a batch request must be POST.", "method")
    if item.get("url") != ENDPOINT:
        message = "The URL provided for this request does not match the batch endpoint."
        return ("invalid_url", message, "url")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return ("missing_required_parameter", _MISSING.format("model"), "body.model")
    if not isinstance(body.get("messages"), list):
        return ("missing_required_parameter", _MISSING.format("messages"), "body.messages")
    if models and body["model"] not in models:
        # OpenAI runs a batch on one model.
        message = "The model of this request differs from the model of earlier requests."
        return ("mismatched_model", message, "body.model")
    return None


def _batch_json(job: BatchJob) -> dict[str, Any]:
    times = job.times
    created = int(times["created"])

    def at(status: str) -> int | None:
        return int(times[status]) if status in times else None

    results = job.results
    completed = sum(r.status == 200 for r in results)
    return {
        "id": job.id,
        "object": "batch",
        "endpoint": ENDPOINT,
        "errors": None if job.errors is None else {"object": "list", "data": job.errors},
        "input_file_id": job.info["input_file_id"],
        "completion_window": WINDOW,
        "status": job.status,
        "output_file_id": job.info.get("output_file_id"),
        "error_file_id": job.info.get("error_file_id"),
        "created_at": created,
        "in_progress_at": at("in_progress"),
        "expires_at": created + 24 * 3600,
        "finalizing_at": at("finalizing"),
        "completed_at": at("completed"),
        "failed_at": at("failed"),
        "expired_at": at("expired"),
        "cancelling_at": at("cancelling"),
        "cancelled_at": at("cancelled"),
        "request_counts": {
            "total": len(job.lines),
            "completed": completed,
            "failed": len(results) - completed,
        },
        "metadata": job.info["metadata"],
    }
