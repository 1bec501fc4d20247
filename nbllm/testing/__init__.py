"""Test helpers: a real OpenAI-compatible chat server on localhost, with faults and rate limits.

``TestServer`` runs in a background thread (``with TestServer() as server: server.url``);
``start_subprocess`` runs the same server as ``python -m nbllm.testing`` in a child process.
Answers are ``"Answer to turn {turn}: {last user text[:60]} [{key[:8]}]"`` and the server
rejects (400, ``history_errors``) any assistant message it did not itself answer (with
``shared_history=True``, any that it would have answered: servers standing for the
deployments of one group then share conversations, each turn on any of them). Tokens
are counted as about 4 characters each; a request whose ``max_tokens`` is smaller than its
answer gets the first ``4 * max_tokens`` characters with ``finish_reason`` ``"length"``
(as a real model is cut off), any other ``"stop"``. A request with ``response_format`` is
answered with JSON that follows its schema (``bad_json_first=N``: the first N are not JSON;
see ``nbllm.testing.structured``). ``latency`` is seconds per answer, a (low, high) range
drawn uniformly, or with ``latency_sigma`` > 0 the median of a lognormal draw (a long right
tail, as a loaded provider's). With ``prompt_cache=True`` each answer says, in
``usage.prompt_tokens_details.cached_tokens``, the tokens of the longest start of its
messages that an earlier request it answered had (``nbllm.testing.prompt_cache``): 0 on a
conversation's first turn, more on each later one. Bad options raise ``ConfigError``.

The server also runs batches, as OpenAI's Files and Batch API (``/v1/files``,
``/v1/batches``) and Anthropic's Message Batches (``/v1/messages/batches``) do: a batch's
lines are answered all at once, in file order and with the same history check,
``batch_delay_s`` (default 0.2) after it is created. ``batch_max_requests``: a larger batch
is refused (OpenAI: ``failed``; Anthropic: a 400); ``batch_fail_first=N``: the first N lines
run get a 500; ``batch_expire_first=N``: the first N batches expire with half their lines
answered. Batch lines are logged in ``server.batch_requests``, not ``server.requests``;
``server.batches`` lists the batches and ``server.stats()`` counts them
(``nbllm.testing.batches``).
"""

from __future__ import annotations

from nbllm.testing.launcher import URL_LINE_PREFIX, SubprocessServer, start_subprocess
from nbllm.testing.options import Fault
from nbllm.testing.request_log import RequestLogEntry, messages_key, read_log
from nbllm.testing.server import TestServer

__all__ = [
    "URL_LINE_PREFIX",
    "Fault",
    "RequestLogEntry",
    "SubprocessServer",
    "TestServer",
    "messages_key",
    "read_log",
    "start_subprocess",
]
