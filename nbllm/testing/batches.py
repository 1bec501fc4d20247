"""The test server's batch jobs: the state behind its OpenAI and Anthropic batch routes.

A batch is a list of chat requests (its lines) that the server answers later, all at once:
``batch_delay_s`` after a batch is created, every line is answered in file order by the
same method as the live route (so a line's history check sees the answers of earlier
batches and of live requests, and a later turn may be sent live or in another batch).
Options, shared by both providers' routes (``nbllm.testing.openai_batches``,
``nbllm.testing.anthropic_batches``):

- ``batch_max_requests``: more lines than this in one batch are refused (OpenAI: the batch
  ``failed``; Anthropic: a 400), with a message naming the limit;
- ``batch_fail_first=N``: the first N lines the server runs get a 500 instead of their
  answer (a line whose history does not match still gets its 400, as a live request does);
- ``batch_expire_first=N``: the first N batches expire: the first half (rounded down) of
  their lines is answered, the rest is reported expired, as a provider reports the requests
  it could not run within the completion window.

A batch's status is kept in OpenAI's words for both providers (validating, in_progress,
finalizing, completed, expired, cancelling, cancelled, failed); the Anthropic routes show
it in Anthropic's. Lines of batches are not in the server's request log: tests read them in
``TestServer.batch_requests``, and the batches in ``TestServer.batches``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nbllm.engines.openai_wire import error_body
from nbllm.testing.options import as_number, refuse_unless
from nbllm.testing.request_log import RequestLogEntry

__all__ = [
    "ENDED",
    "BatchBook",
    "BatchJob",
    "BatchLine",
    "BatchOptions",
    "BatchRecord",
    "LineResult",
    "StoredFile",
    "listed",
    "new_id",
]

#: Answers one chat body: (body, t, conversation, fault) -> (status, payload, log entry).
AnswerLine = Callable[
    [Mapping[str, Any], float, str | None, bool], tuple[int, dict[str, Any], RequestLogEntry]
]

RUNNING = ("validating", "in_progress")  # the statuses a batch can still be cancelled in
ENDED = ("completed", "expired", "cancelled", "failed")


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """The server's batch options (see the module), refused with ``ConfigError`` when bad."""

    delay_s: float = 0.2
    max_requests: int | None = None
    fail_first: int = 0
    expire_first: int = 0

    def __post_init__(self) -> None:
        delay = as_number("batch_delay_s", self.delay_s)
        refuse_unless(delay >= 0, "batch_delay_s", ">= 0", self.delay_s)
        limit = self.max_requests
        refuse_unless(
            limit is None or (type(limit) is int and limit >= 1),
            "batch_max_requests",
            "a whole number >= 1 or None",
            limit,
        )
        for name in ("fail_first", "expire_first"):
            value = getattr(self, name)
            ok = type(value) is int and value >= 0
            refuse_unless(ok, f"batch_{name}", "a whole number >= 0", value)


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One batch as tests read it: ``api`` is "openai" or "anthropic", ``status`` in
    OpenAI's words for both."""

    id: str
    api: str
    n_lines: int
    status: str


@dataclass(frozen=True, slots=True)
class BatchLine:
    """One request of a batch: the OpenAI-shaped chat body to answer, or, for a request
    that cannot be read as one, ``problem``: the message of the 400 it gets when run."""

    custom_id: str
    body: Mapping[str, Any] | None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class LineResult:
    """What became of a line: ``status`` 200 with a chat.completion ``body``, the status of
    an error with an OpenAI error ``body``, or 0 (and no body) for a line that expired."""

    custom_id: str
    status: int
    body: dict[str, Any] | None
    request_id: str


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file of OpenAI's files API: uploaded, or a batch's output or errors."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


class BatchJob:
    """A batch and what became of its lines so far; changed only on the server's loop.

    ``times`` holds the unix time at which each status was entered (and "created");
    ``info`` the provider's own fields (input file, metadata, output files...).
    """

    def __init__(self, id_: str, api: str, lines: list[BatchLine], info: dict[str, Any]) -> None:
        self.id = id_
        self.api = api
        self.lines = lines
        self.info = info
        self.status = "validating"
        self.times: dict[str, float] = {"created": time.time()}
        self.results: list[LineResult] = []
        self.errors: list[dict[str, Any]] | None = None  # why validation failed
        self.on_end: Callable[[BatchJob], None] = _nothing
        self.timer: asyncio.TimerHandle | None = None
        self.expires = False  # runs only half its lines (batch_expire_first)

    def enter(self, status: str) -> None:
        self.status = status
        self.times[status] = time.time()

    def record(self) -> BatchRecord:
        return BatchRecord(self.id, self.api, len(self.lines), self.status)


def _nothing(job: BatchJob) -> None:
    return None


class BatchBook:
    """All batches and files of one server, and the batch part of its logs and counters.

    ``reset_logs`` clears what ``TestServer.reset`` clears; the batches and files stay
    reachable by id, as the remembered answers do.
    """

    def __init__(self, options: BatchOptions, answer: AnswerLine) -> None:
        self.options = options
        self._answer = answer
        self.jobs: dict[str, BatchJob] = {}
        self.files: dict[str, StoredFile] = {}
        self.reset_logs()

    def reset_logs(self) -> None:
        self.logged: list[BatchJob] = []
        self.batch_requests: list[RequestLogEntry] = []
        self.counts = {"batches_created": 0, "batches_cancelled": 0, "files_uploaded": 0}
        self.counts["batch_lines"] = 0
        self._fail_left = self.options.fail_first
        self._expire_left = self.options.expire_first

    def too_many(self, n_lines: int) -> str | None:
        """The message for a batch over ``batch_max_requests``; None when it is within."""
        limit = self.options.max_requests
        if limit is None or n_lines <= limit:
            return None
        return (
            f"The batch has {n_lines} requests, more than this server's limit of {limit} "
            "requests per batch."
        )

    def add(self, job: BatchJob) -> None:
        """Keep a new batch; it runs unless its validation already failed it."""
        self.jobs[job.id] = job
        self.logged.append(job)
        self.counts["batches_created"] += 1
        self.counts["batch_lines"] += len(job.lines)
        if job.status == "failed":
            return
        job.expires = self._expire_left > 0  # by creation order
        self._expire_left -= job.expires
        loop = asyncio.get_running_loop()
        loop.call_soon(self._begin, job)

    def fail(self, job: BatchJob, errors: list[dict[str, Any]]) -> None:
        job.errors = errors
        job.lines = []
        job.enter("failed")

    def cancel(self, job: BatchJob) -> bool:
        """Cancel a batch that has not run yet; False for one that cannot be cancelled."""
        if job.status == "cancelling":
            return True
        if job.status not in RUNNING:
            return False
        if job.timer is not None:
            job.timer.cancel()
        job.enter("cancelling")
        self.counts["batches_cancelled"] += 1
        # Its lines are not answered: a batch is answered in one go when its delay is up.
        asyncio.get_running_loop().call_soon(self._end, job, "cancelled")
        return True

    def _begin(self, job: BatchJob) -> None:
        if job.status != "validating":
            return
        job.enter("in_progress")
        job.timer = asyncio.get_running_loop().call_later(self.options.delay_s, self._finish, job)

    def _finish(self, job: BatchJob) -> None:
        if job.status != "in_progress":
            return
        n = len(job.lines)
        n_run = n // 2 if job.expires else n
        if n_run == n:
            job.enter("finalizing")
        for i, line in enumerate(job.lines):
            request_id = new_id("req_")
            if i >= n_run:
                job.results.append(LineResult(line.custom_id, 0, None, request_id))
                continue
            status, payload = self._run(line)
            job.results.append(LineResult(line.custom_id, status, payload, request_id))
        # Finalizing shows for a loop turn, as a provider's does for a while.
        end = "completed" if n_run == n else "expired"
        asyncio.get_running_loop().call_soon(self._end, job, end)

    def _run(self, line: BatchLine) -> tuple[int, dict[str, Any]]:
        t = time.monotonic()
        if line.problem is not None or line.body is None:
            problem = line.problem or "the request has no body"
            self.batch_requests.append(RequestLogEntry(t, line.custom_id, "", 400, 0, -1))
            return 400, error_body(problem, "invalid_request_error")
        fault = self._fail_left > 0
        self._fail_left -= fault
        status, payload, entry = self._answer(line.body, t, line.custom_id, fault)
        self.batch_requests.append(entry)
        return status, payload

    def _end(self, job: BatchJob, status: str) -> None:
        job.enter(status)
        job.on_end(job)


def listed(
    book: BatchBook, api: str, query: Mapping[str, str], after_key: str, most: int
) -> tuple[list[BatchJob], bool] | str:
    """One page of ``api``'s batches, newest first, after the id ``query[after_key]``: the
    page and whether more follow; or what is wrong with ``limit`` (1 to ``most``)."""
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= most:
        return f"limit: expected a whole number from 1 to {most}"
    newest_first = [job for job in reversed(book.logged) if job.api == api]
    after = query.get(after_key)
    if after is not None:
        ids = [job.id for job in newest_first]
        newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
    return newest_first[:limit], len(newest_first) > limit
