"""The test server's prompt cache (``TestServer(prompt_cache=True)``).

A provider's prompt cache (or a local engine's prefix cache) serves again the start of a
prompt it has already processed. The test server stands for one with a simple rule: the
cached part of a request is the longest run of its first messages, whole messages, that
an earlier request it answered began with (or was). So the first turn of a conversation
has nothing cached, and turn k has turn k-1's messages cached: the earlier questions and
answers up to turn k-1's question (turn k-1's answer was never part of a prompt). Two
conversations share a cached start only where their first messages are the same (a
common system prompt). The figure depends only on the requests answered before, never on
the clock: the same requests in the same order get the same figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nbllm.testing.request_log import prefix_keys

__all__ = ["PromptCache"]


class PromptCache:
    """The starts of the requests answered so far, by the key of their messages."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def held(self, messages: Sequence[Mapping[str, Any]]) -> int:
        """How many of the first ``messages`` an earlier request answered began with; then
        the request's own starts are kept for the next ones (call it once it is answered)."""
        n = len(messages)
        prefixes, whole = prefix_keys(messages, range(1, n))
        keys = [*(prefixes[i] for i in range(1, n)), whole]  # keys[j]: messages[: j + 1]
        held = 0
        for key in keys:  # every start of a request is kept, so the held ones come first
            if key not in self._seen:
                break
            held += 1
        self._seen.update(keys)
        return held
