"""Who answers a turn: one model, its answer parsed, or several at once. A mixin of
``Executor``.

``_answer`` asks a turn of one model (its ``_turn``: the cache, then attempts with retries)
and parses the answer: one that does not parse is asked again, shown its error, up to
``parse_retries`` times, outside the conversation's history. A turn whose ``turn_params``
give a ``response_format`` (a pydantic class or a JSON schema) is sent that schema and
parsed by it instead of the run's (``_parser_for``, ``_turn_params``).

Each model of ``model=[...]`` is a ``Member``: its name (what its rows say in ``model``),
its lanes (one engine, or the deployments of a group), and who answers for the response
cache. Without ``ensemble=`` every conversation is asked of every member, each with its
own history (the executor runs one conversation per (conversation, member)). With
``ensemble=`` a conversation is asked once, and each of its turns goes to every member
at once (each member's request under its own limits, slots and breakers):

- ``"first"``: the first valid answer (answered, and parsed where a parser or schema is
  set) is kept and is the history of the next turn; the other members' requests are
  withdrawn: cancelled, which stops nothing else of the run.
- ``"vote"``: every member answers; the answer most of them gave (``agreement_key``) is
  kept, the first member's on a tie, with ``votes`` saying how many gave it. The row
  counts every member's tokens and cost (all were paid for), the slowest member's time
  (the turn waited for it) and the kept member's attempts (each deployment's requests are
  in ``summary.deployments``).

Withdrawing a request is told apart from a stop by the task it runs in (``_withdrawing``):
a cancel of a withdrawn member's request is not a stop, and its lane counts it as
abandoned. A stop that cancels the worker cancels its members as a stop; an answer kept
by then is recorded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from nbllm.engines.base import Engine
from nbllm.executor.cache import KeyChain
from nbllm.executor.events import Event
from nbllm.executor.lanes import Lanes, Routes, build_lanes
from nbllm.executor.limits import RunLimits
from nbllm.executor.rows import merged
from nbllm.executor.sending import SENT
from nbllm.parsing import ParseFailed, make_parser
from nbllm.results_models import ENSEMBLES, EnsembleTotals, agreement_key
from nbllm.types import Conversation, TurnRecord

if TYPE_CHECKING:
    from nbllm.parsing import Parser

__all__ = ["Ensembles", "Member", "check_ensemble", "members"]

#: Each member's part in a turn, for ``EnsembleTotals``: its seconds, or withdrawn.
_WITHDRAWN = -1.0


@dataclass(frozen=True)
class Member:
    """One model of the run: ``name`` as given, ``lanes`` it is sent on, ``row_model``
    what its rows name (None: the model the engine reports), ``scope`` who answers (the
    response cache's key)."""

    name: str
    lanes: Lanes
    row_model: str | None
    scope: str


def members(
    targets: Sequence[tuple[str, Engine | Routes]],
    params: Mapping[str, Any],
    timeout: float | None,
    limits: Callable[[str, dict[str, Any]], RunLimits],
    emit: Callable[[Event], None],
    scoped: bool,
) -> list[Member]:
    """A member per (name, engine or routes) of ``targets`` (see ``build_lanes``);
    ``scoped``: each knows who answers (for a response cache)."""
    several = len(targets) > 1
    return [
        Member(
            name,
            build_lanes(to, name, params, timeout, limits, emit),
            name if several or not isinstance(to, Engine) else None,  # a group: named
            to.identity() if scoped else "",
        )
        for name, to in targets
    ]


def check_ensemble(ensemble: str | None, models: int) -> None:
    if ensemble is not None and (ensemble not in ENSEMBLES or models < 2):
        msg = f"ensemble= takes {' or '.join(repr(e) for e in ENSEMBLES)} with two models or more"
        raise ValueError(msg)


def _turn_seconds(record: TurnRecord) -> float | None:
    if not record.ok or record.queue_s is None or record.service_s is None:
        return None
    return record.queue_s + record.service_s


def _sum(values: Sequence[Any]) -> Any:
    given = [v for v in values if v is not None]
    return sum(given) if given else None


class Ensembles:
    """``ensemble=`` turns (see the module)."""

    members: list[Member]
    ensemble: str | None
    parser: Parser | None
    parse_retries: int
    _stopping: bool
    _withdrawing: set[asyncio.Task[Any]]
    _ensemble_totals: EnsembleTotals | None
    _turn_parsers: dict[int, Parser | None]

    async def _turn(
        self,
        member: Member,
        conv: Conversation,
        k: int,
        answers: Sequence[str],
        keys: KeyChain | None,
        repair: tuple[str, str] | None = None,
    ) -> TurnRecord | None:
        raise NotImplementedError

    async def _answer(
        self,
        member: Member,
        conv: Conversation,
        k: int,
        answers: Sequence[str],
        keys: KeyChain | None,
    ) -> TurnRecord | None:
        """Turn k asked of ``member``, its answer parsed; None when stopped first."""
        record = await self._turn(member, conv, k, answers, keys)
        parser = self._parser_for(conv, k)
        if record is not None and parser is not None and record.ok:
            record = await self._parsed(member, record, conv, k, answers, parser)
        return record

    def _parser_for(self, conv: Conversation, k: int) -> Parser | None:
        """What reads turn k's answer: its own ``response_format``, else the run's parser."""
        given = conv.params_for(k).get("response_format")
        if given is None:
            return self.parser
        made = self._turn_parsers.get(id(given))
        if made is None:
            made = self._turn_parsers[id(given)] = make_parser(given)
        return made

    def _turn_params(self, conv: Conversation, k: int) -> Mapping[str, Any]:
        """Turn k's own sampling parameters as an engine is sent them: a ``response_format``
        in the wire's form (a pydantic class made a JSON schema)."""
        extra = conv.params_for(k)
        if extra.get("response_format") is None:
            return extra
        parser = self._parser_for(conv, k)
        assert parser is not None
        return {**extra, "response_format": parser.wire}

    async def _parsed(
        self,
        member: Member,
        record: TurnRecord,
        conv: Conversation,
        k: int,
        answers: Sequence[str],
        parser: Parser,
    ) -> TurnRecord | None:
        """``record`` with its answer parsed by ``parser``; an answer that does not parse is
        asked again (shown its error) up to ``parse_retries`` times, outside the
        conversation's history. None when the run stops before an answer parses."""
        tries = 0
        while True:
            try:
                value = parser.parse(record.answer or "")
            except ParseFailed as error:
                if tries >= self.parse_retries or self._stopping:
                    failed = f"ParseError: {error}"
                    return replace(record, error=failed, parse_retries=tries)
                tries += 1
                repair = (record.answer or "", parser.repair(str(error)))
                again = await self._turn(member, conv, k, answers, None, repair)
                if again is None:
                    return None
                record = merged(record, again, tries)
                if not again.ok:
                    return record
                continue
            return replace(record, parsed=value, parse_retries=tries)

    async def _member_answer(
        self,
        sent: list[str],
        member: Member,
        conv: Conversation,
        k: int,
        answers: Sequence[str],
        keys: KeyChain | None,
    ) -> TurnRecord | None:
        """``_answer`` in a member's own task, its requests counted in ``sent``."""
        SENT.set(sent)
        return await self._answer(member, conv, k, answers, keys)

    def _withdrawn(self) -> bool:
        """Whether the request being cancelled was withdrawn (not a stop)."""
        return asyncio.current_task() in self._withdrawing

    async def _ensemble_turn(
        self,
        conv: Conversation,
        k: int,
        answers: Sequence[str],
        keys: Sequence[KeyChain | None],
    ) -> TurnRecord | None:
        """Turn k asked of every member; the row kept, or None when stopped first."""
        loop = asyncio.get_running_loop()
        ready = loop.time()
        sent: list[list[str]] = [[] for _ in self.members]  # each member's requests
        tasks = [
            loop.create_task(self._member_answer(sent[i], member, conv, k, answers, keys[i]))
            for i, member in enumerate(self.members)
        ]
        first = self.ensemble == "first"
        done: dict[int, TurnRecord | None] = {}
        seconds = 0.0
        try:
            pending = set(tasks)
            while pending and not (first and any(r is not None and r.ok for r in done.values())):
                finished, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
                for task in finished:
                    done[tasks.index(task)] = task.result()
            seconds = loop.time() - ready  # the turn's answer is in: the ensemble's time
        except asyncio.CancelledError:
            # A stop: the members are cancelled as a stop; an answer in hand is kept.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            kept = [t.result() for t in tasks if not t.cancelled() and t.exception() is None]
            answered = [r for r in kept if r is not None and r.ok]
            if first and answered:
                return answered[0]
            raise
        withdrawn = [task for task in tasks if not task.done()]
        self._withdrawing.update(withdrawn)
        for task in withdrawn:
            task.cancel()
        try:
            await asyncio.gather(*withdrawn, return_exceptions=True)
        finally:
            self._withdrawing.difference_update(withdrawn)
        records = [done.get(i) for i in range(len(tasks))]
        row, kept_by = self._kept(records)
        if row is None:
            return None
        # Every model's requests for the turn, the withdrawn ones too (retries are the rest).
        asked = sum(1 for requests in sent if requests)
        row = replace(row, attempts=sum(map(len, sent)), asked=max(asked, 1))
        if self._ensemble_totals is not None:
            times = [
                _WITHDRAWN if task in withdrawn else None if r is None else _turn_seconds(r)
                for task, r in zip(tasks, records, strict=True)
            ]
            self._ensemble_totals.turn(seconds, kept_by, times)
        return row

    def _kept(self, records: Sequence[TurnRecord | None]) -> tuple[TurnRecord | None, int | None]:
        """The row a turn keeps from its members' records (None: a member never finished)
        and the index of the member it came from."""
        if self.ensemble == "first":
            # The valid answer that finished first (the first model's on a tie).
            answered = [(i, r) for i, r in enumerate(records) if r is not None and r.ok]
            if answered:
                best = min(answered, key=lambda p: (p[1].finished_at or 0.0, p[0]))
                return best[1], best[0]
        elif any(r is None for r in records):
            return None, None  # stopped before every member answered: not finished
        else:
            by_parsed = any(r is not None and r.parsed is not None for r in records)
            votes: dict[str, list[int]] = {}
            for i, r in enumerate(records):
                key = agreement_key(r, by_parsed) if r is not None else None
                if key is not None:
                    votes.setdefault(key, []).append(i)
            if votes:
                most = max(len(v) for v in votes.values())
                winner = min(v[0] for v in votes.values() if len(v) == most)
                return self._paid_for(records, winner, most), winner
        finished = [r for r in records if r is not None]
        if not finished:
            return None, None
        errors = [f"{m.name}: {r.error}" for m, r in zip(self.members, records, strict=True) if r]
        return replace(finished[0], error="; ".join(errors)), None

    def _paid_for(
        self, records: Sequence[TurnRecord | None], winner: int, votes: int
    ) -> TurnRecord:
        """The vote's row: the winner's answer and attempts, every member's tokens and
        cost, and the slowest member's time."""
        every = [r for r in records if r is not None]
        slowest = max(every, key=lambda r: (r.queue_s or 0.0) + (r.service_s or 0.0))
        kept = records[winner]
        assert kept is not None
        return replace(
            kept,
            votes=votes,
            prompt_tokens=_sum([r.prompt_tokens for r in every]),
            completion_tokens=_sum([r.completion_tokens for r in every]),
            cached_tokens=_sum([r.cached_tokens for r in every]),
            cost_usd=_sum([r.cost_usd for r in every]),
            saved_usd=_sum([r.saved_usd for r in every]),
            latency_s=max((r.latency_s or 0.0) for r in every),
            queue_s=slowest.queue_s,
            service_s=slowest.service_s,
            started_at=min((r.started_at or 0.0) for r in every) or kept.started_at,
            finished_at=max((r.finished_at or 0.0) for r in every) or kept.finished_at,
        )
