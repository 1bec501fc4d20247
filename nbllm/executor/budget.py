"""A hard cap on what a run spends: dollars (``max_cost_usd``) and tokens (``max_tokens_total``).

The cap is on what the run's result holds: answers resumed from the checkpoint count
with what they cost when they were bought, cached answers count nothing (no request
was sent for them). Before each request leaves, the executor asks ``reached()``; once
the spending is at or over a cap, no new request starts and the ones in flight finish,
so the overshoot is at most the requests already in flight. Running the same call
again with a higher cap resumes from the checkpoint. A batch (``batch_api=True``) holds
its requests' worst case (their prompts and ``max_tokens`` at the batch price) before it
is created (``fit``), and releases it when it ends (``release``): no batch can take the
run past a cap.

A request's cost is what the engine reported (litellm's price table), or its tokens at
``cost_per_1k_tokens`` when given. With ``max_cost_usd`` set, an answer whose cost is
unknown stops the run as well: a cap that cannot be counted is not kept by guessing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from nbllm.errors import ConfigError
from nbllm.types import ChatResponse, TurnRecord

__all__ = ["Budget", "priced"]


def priced(response: ChatResponse, price: float | None) -> float | None:
    """An answer's cost: the engine's, else its tokens at ``price`` dollars per 1,000
    (prompt and completion), else None (not known)."""
    if response.cost_usd is not None or price is None:
        return response.cost_usd
    return ((response.prompt_tokens or 0) + (response.completion_tokens or 0)) * price / 1000


def _cap(name: str, value: float | None, *, whole: bool = False) -> float | None:
    if value is None:
        return None
    ok = isinstance(value, int) if whole else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        expected = "a whole number > 0" if whole else "a number > 0"
        msg = f"{name}= expected {expected} or None, got {value!r}"
        raise ConfigError(msg)
    return value


class Budget:
    """What a run may spend, and what it has spent so far."""

    def __init__(
        self,
        *,
        max_cost_usd: float | None = None,
        max_tokens_total: int | None = None,
        cost_per_1k_tokens: float | None = None,
    ) -> None:
        self.max_cost_usd = _cap("max_cost_usd", max_cost_usd)
        self.max_tokens_total = _cap("max_tokens_total", max_tokens_total, whole=True)
        self.cost_per_1k_tokens = _cap("cost_per_1k_tokens", cost_per_1k_tokens)
        self.cost_usd = 0.0
        self.tokens = 0
        # Held by batches in flight (batch_api=True): their worst case, until they end.
        self.reserved_usd = 0.0
        self.reserved_tokens = 0
        self._unknown_cost: str | None = None

    def __repr__(self) -> str:
        return (
            f"Budget(max_cost_usd={self.max_cost_usd!r}, "
            f"max_tokens_total={self.max_tokens_total!r}, spent_usd={self.cost_usd:.6g}, "
            f"spent_tokens={self.tokens})"
        )

    @property
    def capped(self) -> bool:
        return self.max_cost_usd is not None or self.max_tokens_total is not None

    def count_stored(self, records: Iterable[TurnRecord]) -> None:
        """Count answers bought by an earlier run (resumed from the checkpoint)."""
        for record in records:
            self.cost_usd += record.cost_usd or 0.0
            self.tokens += (record.prompt_tokens or 0) + (record.completion_tokens or 0)

    def charge(self, response: ChatResponse, price: float | None = None) -> float | None:
        """Count an answer this run bought; its cost (the engine's, or from ``price``, the
        deployment's own cost per 1,000 tokens, else ``cost_per_1k_tokens``), None where
        neither is known."""
        self.tokens += (response.prompt_tokens or 0) + (response.completion_tokens or 0)
        cost = priced(response, self.cost_per_1k_tokens if price is None else price)
        if cost is None:
            if self.max_cost_usd is not None and self._unknown_cost is None:
                self._unknown_cost = (
                    f"budget: max_cost_usd={self.max_cost_usd!r} cannot be kept: no cost is "
                    f"known for {response.model!r}'s answers (give cost_per_1k_tokens=)"
                )
            return None
        self.cost_usd += cost
        return cost

    def fit(
        self, worst: list[tuple[float | None, int]]
    ) -> tuple[int, tuple[float, int], str | None]:
        """How many of these requests (each its worst-case cost, None where unknown, and
        tokens, in order) fit under the caps with what is spent and held; those are held.
        Returns that count, what was held (dollars, tokens: the amounts to ``release``)
        and, with fewer than all, why the rest does not fit."""
        cost, tokens = self.cost_usd + self.reserved_usd, self.tokens + self.reserved_tokens
        held_usd, held_tokens, taken = 0.0, 0, 0
        price = self.cost_per_1k_tokens
        broken: tuple[str, float | None] | None = None
        for line_cost, line_tokens in worst:
            if line_cost is None:
                line_cost = 0.0 if price is None else line_tokens * price / 1000
            if self.max_cost_usd is not None and cost + line_cost > self.max_cost_usd:
                broken = ("max_cost_usd", self.max_cost_usd)
                break
            if self.max_tokens_total is not None and tokens + line_tokens > self.max_tokens_total:
                broken = ("max_tokens_total", self.max_tokens_total)
                break
            cost, tokens, taken = cost + line_cost, tokens + line_tokens, taken + 1
            held_usd, held_tokens = held_usd + line_cost, held_tokens + line_tokens
        self.reserved_usd += held_usd
        self.reserved_tokens += held_tokens
        why = None
        if broken is not None:
            why = f"budget: {broken[0]}={broken[1]!r} would be passed by a batch's worst case"
        return taken, (held_usd, held_tokens), why

    def release(self, cost: float, tokens: int) -> None:
        """A batch has ended: what it held is free (its answers are charged as they come)."""
        self.reserved_usd = max(0.0, self.reserved_usd - cost)
        self.reserved_tokens = max(0, self.reserved_tokens - tokens)

    def reached(self) -> str | None:
        """Why no new request may start (``"budget: max_cost_usd=5.0 reached"``), or None."""
        if self._unknown_cost is not None:
            return self._unknown_cost
        if self.max_cost_usd is not None and self.cost_usd >= self.max_cost_usd:
            return f"budget: max_cost_usd={self.max_cost_usd!r} reached"
        if self.max_tokens_total is not None and self.tokens >= self.max_tokens_total:
            return f"budget: max_tokens_total={self.max_tokens_total!r} reached"
        return None
