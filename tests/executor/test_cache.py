"""The response cache: a request already answered is not sent again, across runs.

Promises pinned here: identical requests are answered from the cache whatever the
checkpoint (another path, or none), with ``cached=True``, ``latency_s == 0``,
``attempts == 0`` and a count in ``summary.cached``; ``cache=False`` sends everything;
an explicit non-zero temperature is not reused unless ``cache="always"``; the key is the
model, the messages and the sampling parameters (never the key or the server's address);
a file nbllm cannot use is refused before any request and left as it is; a cached row
names the engine and model that produced the answer and why it ended, not the engine of
the run that reads it; a cache written by the previous nbllm (schema 1) is migrated in
place and its answers read back with no engine and no finish_reason (never stored).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from helpers import (
    answer_from_history,
    digest,
    on_fake_clock,
    random_bytes,
    rewrite_as_schema_1,
    schema_of,
    uninterrupted_answers,
)

import nbllm
from nbllm import ChatRequest, ChatResponse, FakeEngine, RequestRejected
from nbllm.errors import CheckpointError
from nbllm.executor.cache import BATCH_DELAY_S, BATCH_ROWS, CachedResponse, ResponseCache
from nbllm.testing import TestServer


def dataset(n: int = 6, question: str = "question") -> list[dict]:
    return [
        {"id": f"c{i}", "turns": [f"c{i} {question} {k}" for k in range(1 + i % 3)]}
        for i in range(n)
    ]


def n_turns(data: list[dict]) -> int:
    return sum(len(r["turns"]) for r in data)


def recording_engine() -> tuple[FakeEngine, list[str]]:
    sent: list[str] = []

    def handler(request: ChatRequest) -> str:
        sent.append(str(request.messages[-1]["content"]))
        return f"({request.model}) {answer_from_history(request)}"

    return FakeEngine(handler), sent


def assert_all_cached(result: nbllm.RunResult) -> None:
    df = result.df
    assert df["cached"].all()
    assert (df["latency_s"] == 0).all()
    assert (df["attempts"] == 0).all()
    assert df["error"].isna().all()
    assert not df["resumed"].any()
    assert result.summary.cached == len(df) == result.summary.turns_ok
    assert result.summary.latency_p50 is None  # no request was sent: no latency to report
    assert result.summary.retries == 0


# --------------------------------------------------------------------------- across runs


@pytest.mark.parametrize("checkpoints", [("a.sqlite", "b.sqlite"), (False, False), (True, False)])
def test_a_second_run_is_served_from_the_cache(tmp_path, checkpoints):
    first_ckpt, second_ckpt = (c if isinstance(c, bool) else tmp_path / c for c in checkpoints)
    data = dataset()
    with TestServer() as server:
        options = {"model": "nbllm-test", "api_base": server.url, "progress": False}
        first = nbllm.run(data, checkpoint=first_ckpt, **options)
        assert len(server.requests) == n_turns(data)
        second = nbllm.run(data, checkpoint=second_ckpt, **options)
        assert len(server.requests) == n_turns(data)  # nothing more was sent
    assert server.history_errors == 0
    assert not first.df["cached"].any()
    assert first.summary.cached == 0
    assert_all_cached(second)
    assert list(second.df["answer"]) == list(first.df["answer"])
    assert list(second.df["prompt_tokens"]) == list(first.df["prompt_tokens"])
    assert list(second.df["completion_tokens"]) == list(first.df["completion_tokens"])


def test_cache_false_sends_every_request(_nbllm_dir):
    data = dataset()
    engine, sent = recording_engine()
    for _ in range(2):
        result = nbllm.run(
            data, engine=engine, model="m", checkpoint=False, cache=False, progress=False
        )
        assert not result.df["cached"].any() and result.summary.cached == 0
    assert len(sent) == 2 * n_turns(data)
    assert not (_nbllm_dir / "cache.sqlite").exists()


def test_cache_false_neither_reads_nor_writes_an_existing_cache(_nbllm_dir):
    data = dataset()
    engine, sent = recording_engine()
    options = {"engine": engine, "model": "m", "checkpoint": False, "progress": False}
    nbllm.run(data, **options)  # fills the default cache
    before = digest(_nbllm_dir / "cache.sqlite")
    result = nbllm.run(data, cache=False, **options)
    assert len(sent) == 2 * n_turns(data)
    assert not result.df["cached"].any()
    assert digest(_nbllm_dir / "cache.sqlite") == before


# --------------------------------------------------------------------------- temperature


def test_a_non_zero_temperature_is_not_reused_but_its_answers_are_stored():
    data = dataset()
    engine, sent = recording_engine()
    options = {"engine": engine, "model": "m", "checkpoint": False, "progress": False}
    nbllm.run(data, temperature=0.7, **options)
    again = nbllm.run(data, temperature=0.7, **options)
    assert len(sent) == 2 * n_turns(data)
    assert not again.df["cached"].any()
    # The answers were stored all the same: cache="always" reuses them.
    always = nbllm.run(data, temperature=0.7, cache="always", **options)
    assert len(sent) == 2 * n_turns(data)
    assert_all_cached(always)


def test_cache_always_reuses_sampled_answers():
    data = dataset()
    engine, sent = recording_engine()
    options = {"engine": engine, "model": "m", "checkpoint": False, "progress": False}
    first = nbllm.run(data, temperature=1.0, cache="always", **options)
    second = nbllm.run(data, temperature=1.0, cache="always", **options)
    assert len(sent) == n_turns(data)
    assert not first.df["cached"].any()
    assert_all_cached(second)


@pytest.mark.parametrize("temperature", [None, 0, 0.0])
def test_greedy_or_default_temperature_is_reused(temperature):
    data = dataset()
    engine, sent = recording_engine()
    options = {"engine": engine, "model": "m", "checkpoint": False, "progress": False}
    nbllm.run(data, temperature=temperature, **options)
    second = nbllm.run(data, temperature=temperature, **options)
    assert len(sent) == n_turns(data)
    assert_all_cached(second)


# --------------------------------------------------------------------------- the key


def test_the_key_ignores_the_api_key_and_its_password_in_the_url():
    data = dataset()
    with TestServer() as server:
        options = {"model": "nbllm-test", "progress": False, "checkpoint": False}
        first = nbllm.run(data, api_base=server.url, api_key="key-one", **options)
        with_password = server.url.replace("http://", "http://me:pa55word@")
        second = nbllm.run(data, api_base=server.url, api_key="key-two", **options)
        third = nbllm.run(data, api_base=with_password, **options)
    assert first.summary.turns_ok == n_turns(data)
    assert len(server.requests) == n_turns(data)
    assert_all_cached(second)
    assert_all_cached(third)
    assert list(second.df["answer"]) == list(first.df["answer"])


def test_a_changed_question_sends_only_what_depends_on_it():
    data = dataset()
    engine, sent = recording_engine()
    options = {"engine": engine, "model": "m", "checkpoint": False, "progress": False}
    nbllm.run(data, **options)
    sent.clear()
    changed = dataset()
    changed[5]["turns"][1] = "c5 a different question 1"  # c5 has turns 0, 1, 2
    result = nbllm.run(changed, **options)
    # Turn 0 is the same request; turn 1 changed; turn 2 has a new history.
    assert sorted(sent) == ["c5 a different question 1", "c5 question 2"]
    cached = result.df.set_index(["conversation_id", "turn"])["cached"]
    assert not cached[("c5", 1)] and not cached[("c5", 2)]
    assert cached.drop([("c5", 1), ("c5", 2)]).all()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"model": "other-model"}, id="model"),
        pytest.param({"max_tokens": 7}, id="max_tokens"),
        pytest.param({"system": "Be brief."}, id="system"),
        pytest.param({"top_p": 0.5}, id="extra-param"),
    ],
)
def test_the_key_changes_with_what_is_sent(change):
    data = dataset()
    engine, sent = recording_engine()
    options = {"engine": engine, "model": "m", "checkpoint": False, "progress": False}
    nbllm.run(data, **options)
    result = nbllm.run(data, **{**options, **change})
    assert len(sent) == 2 * n_turns(data)
    assert not result.df["cached"].any()


# --------------------------------------------------------------------------- where it lives


def test_the_default_cache_is_nbllm_dir_cache_sqlite(_nbllm_dir):
    nbllm.run(dataset(2), engine=FakeEngine(), model="m", checkpoint=False, progress=False)
    path = _nbllm_dir / "cache.sqlite"
    assert path.is_file()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == n_turns(dataset(2))
        assert dict(conn.execute("SELECT key, value FROM meta"))["kind"] == "response cache"
    finally:
        conn.close()


def test_a_custom_cache_path_is_used(tmp_path, _nbllm_dir):
    data = dataset()
    engine, sent = recording_engine()
    options = {"engine": engine, "model": "m", "checkpoint": False, "progress": False}
    custom = tmp_path / "c.sqlite"
    nbllm.run(data, cache=custom, **options)
    assert custom.is_file()
    assert not (_nbllm_dir / "cache.sqlite").exists()
    assert_all_cached(nbllm.run(data, cache=custom, **options))
    assert len(sent) == n_turns(data)
    # The default cache is another file: it has none of these answers.
    default = nbllm.run(data, **options)
    assert not default.df["cached"].any()
    assert len(sent) == 2 * n_turns(data)
    # A path without a .sqlite suffix is a folder holding cache.sqlite.
    folder = tmp_path / "cache-folder"
    nbllm.run(data, cache=folder, **options)
    assert (folder / "cache.sqlite").is_file()


async def test_runs_at_the_same_time_share_the_cache():
    one, two = dataset(8), dataset(8, question="other question")
    engine, sent = recording_engine()
    options = {"engine": engine, "model": "m", "progress": False, "concurrency": 4}
    results = await asyncio.wait_for(
        asyncio.gather(nbllm.arun(one, **options), nbllm.arun(two, **options)), 20
    )
    assert [r.summary.turns_ok for r in results] == [n_turns(one), n_turns(two)]
    both = nbllm.run(one + [{**r, "id": f"two-{r['id']}"} for r in two], **options)
    assert len(sent) == n_turns(one) + n_turns(two)
    assert_all_cached(both)


def test_cached_answers_are_checkpointed_and_resumed(tmp_path):
    data = dataset()
    engine, sent = recording_engine()
    options = {"engine": engine, "model": "m", "progress": False}
    nbllm.run(data, checkpoint=tmp_path / "one.sqlite", **options)
    cached = nbllm.run(data, checkpoint=tmp_path / "two.sqlite", **options)
    resumed = nbllm.run(data, checkpoint=tmp_path / "two.sqlite", **options)
    assert len(sent) == n_turns(data)
    assert_all_cached(cached)
    assert resumed.df["resumed"].all()
    assert list(resumed.df["answer"]) == list(cached.df["answer"])


def test_a_cached_or_resumed_row_keeps_the_cached_tokens_its_answer_came_with(tmp_path):
    def handler(request: ChatRequest) -> ChatResponse:
        turn = len(request.messages) // 2
        return ChatResponse(answer_from_history(request), "m", 10 + turn, 2, cached_tokens=turn)

    data = dataset()
    options = {"engine": FakeEngine(handler), "model": "m", "progress": False}
    sent = nbllm.run(data, checkpoint=tmp_path / "one.sqlite", **options)
    cached = nbllm.run(data, checkpoint=tmp_path / "two.sqlite", **options)
    resumed = nbllm.run(data, checkpoint=tmp_path / "two.sqlite", **options)
    assert_all_cached(cached)
    assert resumed.df["resumed"].all()
    expected = list(sent.df["turn"])
    assert list(sent.df["cached_tokens"]) == expected
    assert list(cached.df["cached_tokens"]) == expected
    assert list(resumed.df["cached_tokens"]) == expected


def test_the_turns_after_a_resumed_one_are_keyed_with_its_stored_answer(tmp_path):
    """A checkpoint holding only the first turns, a cache holding every turn: the later
    turns' keys include the stored answers, so all of them come from the cache."""
    data = dataset()
    only_first_turns = False
    sent: list[str] = []

    def handler(request: ChatRequest) -> str:
        sent.append(str(request.messages[-1]["content"]))
        if only_first_turns and len(request.messages) > 1:
            raise RequestRejected("HTTP 400: not now")
        return answer_from_history(request)

    options = {"engine": FakeEngine(handler), "model": "m", "progress": False}
    full = nbllm.run(data, checkpoint=False, **options)  # fills the cache
    assert list(full.df["answer"]) == uninterrupted_answers(data)
    path = tmp_path / "ckpt.sqlite"
    only_first_turns = True
    partial = nbllm.run(data, checkpoint=path, cache=False, **options)
    assert partial.summary.turns_ok == len(data)

    only_first_turns = False
    sent.clear()
    resumed = nbllm.run(data, checkpoint=path, **options)
    assert sent == []
    df = resumed.df
    assert df["resumed"].tolist() == (df["turn"] == 0).tolist()
    assert df["cached"].tolist() == (df["turn"] > 0).tolist()
    assert list(df["answer"]) == list(full.df["answer"])


# --------------------------------------------------------------------------- unusable files


# The damaged, foreign and future files of both kinds: tests/executor/test_storage.py.


def test_an_unusable_cache_sends_no_http_request(_nbllm_dir):
    path = _nbllm_dir / "cache.sqlite"
    path.parent.mkdir(parents=True)
    random_bytes(path)
    with TestServer() as server, pytest.raises(CheckpointError, match=r"cache\.sqlite"):
        nbllm.run(dataset(), model="nbllm-test", api_base=server.url, progress=False)
    assert server.requests == []


def test_a_refused_cache_leaves_the_checkpoint_free(tmp_path, _nbllm_dir):
    path = _nbllm_dir / "cache.sqlite"
    path.parent.mkdir(parents=True)
    random_bytes(path)
    checkpoint = tmp_path / "ckpt.sqlite"
    options = {"model": "m", "checkpoint": checkpoint, "progress": False}
    with pytest.raises(CheckpointError, match=r"cache\.sqlite"):
        nbllm.run(dataset(), engine=FakeEngine(), **options)
    # The checkpoint opened before the cache was refused: its lock is free again.
    engine = FakeEngine()
    result = nbllm.run(dataset(), engine=engine, cache=False, **options)
    assert result.summary.turns_ok == engine.calls == n_turns(dataset())


def test_incremental_keys_equal_whole_request_keys():
    """The executor hashes a conversation's history incrementally; the key must not differ."""
    from nbllm.executor.cache import KeyChain, request_key
    from nbllm.types import ChatRequest, Conversation

    conv = Conversation(id="c", questions=("q0", "q1", "q2"), system="sys", context="ctx")
    answers = ["a0", "a1"]
    params = {"max_tokens": 8, "temperature": 0}
    chain = KeyChain("openai/m", params)
    chain.extend({"role": "system", "content": conv.system_message()})
    for k in range(3):
        messages = conv.messages_for(k, answers[:k])
        assert chain.key_with(messages[-1]) == request_key(ChatRequest("m", messages, params))
        if k < 2:
            chain.extend({"role": "user", "content": conv.questions[k]})
            chain.extend({"role": "assistant", "content": answers[k]})


# --------------------------------------------------------------------------- who answered


def test_a_stored_answer_comes_back_with_its_engine_model_and_finish_reason(tmp_path):
    path = tmp_path / "cache.sqlite"
    response = ChatResponse(
        "cut sh", "served-model", 3, 2, 0.5, finish_reason="length", cached_tokens=1
    )
    cache = ResponseCache(path)
    cache.put("k", response, engine="torch")
    stored = CachedResponse(
        "cut sh", "served-model", 3, 2, 0.5, "length", cached_tokens=1, engine="torch"
    )
    assert cache.get("k") == stored
    cache.close()
    again = ResponseCache(path)  # from the file this time
    try:
        assert again.get("k") == stored
        assert again.get("other") is None
    finally:
        again.close()


def test_an_answer_is_served_again_only_for_the_same_engine_and_server(tmp_path):
    """Answered over HTTP by one server: another engine, or another server with the same
    model name, is asked afresh; the same server is answered from the cache, and the rows
    name the engine and the model the server named."""
    data = dataset(3)
    cache = tmp_path / "cache.sqlite"
    options = {"model": "nbllm-test", "cache": cache, "checkpoint": False, "progress": False}
    with TestServer() as server, TestServer() as other:
        first = nbllm.run(data, api_base=server.url, **options)
        elsewhere = nbllm.run(data, api_base=other.url, **options)
        engine = FakeEngine()
        fake = nbllm.run(data, engine=engine, **options)
        again = nbllm.run(data, api_base=server.url, **options)
    assert not elsewhere.df["cached"].any()
    assert engine.calls == n_turns(data)
    assert not fake.df["cached"].any()
    assert_all_cached(again)
    assert set(again.df["engine"]) == {"openai"}
    assert again.df["model"].tolist() == first.df["model"].tolist()
    assert again.df["finish_reason"].tolist() == first.df["finish_reason"].tolist()


def test_credentials_in_parameters_are_not_part_of_the_key():
    """A rotated header value or key in the parameters still finds the stored answer."""
    from nbllm.executor.cache import request_key

    messages = [{"role": "user", "content": "hi"}]
    one = ChatRequest("m", messages, {"extra_headers": {"Authorization": "Bearer a1b2c3d4"}})
    two = ChatRequest("m", messages, {"extra_headers": {"Authorization": "Bearer z9y8x7w6"}})
    assert request_key(one, "openai @ http://h/v1") == request_key(two, "openai @ http://h/v1")
    assert request_key(one, "openai @ http://h/v1") != request_key(one, "openai @ http://g/v1")


def committed_answers(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    finally:
        conn.close()


@on_fake_clock
async def test_answers_are_committed_in_batches_and_read_back_before(tmp_path):
    """A batch is committed BATCH_DELAY_S after its first answer (or at BATCH_ROWS
    answers); until then the cache still answers from memory."""
    assert (BATCH_DELAY_S, BATCH_ROWS) == (0.25, 200)  # the module docstring's figures
    path = tmp_path / "cache.sqlite"
    cache = ResponseCache(path)
    try:
        cache.put("a", ChatResponse("A", "m"), engine="openai")
        hit = cache.get("a")
        assert hit is not None and (hit.text, hit.engine) == ("A", "openai")
        await asyncio.sleep(BATCH_DELAY_S * 0.9)
        cache.put("b", ChatResponse("B", "m"), engine="openai")
        assert committed_answers(path) == 0
        await asyncio.sleep(BATCH_DELAY_S * 0.1)
        assert committed_answers(path) == 2
        assert cache.commits == 1
        for i in range(BATCH_ROWS):
            cache.put(f"k{i}", ChatResponse("C", "m"))
        assert committed_answers(path) == 2 + BATCH_ROWS  # no await: the count did it
    finally:
        cache.close()


# --------------------------------------------------------------------------- schema 1

# The responses table of cache schema 1 (nbllm before the engine was stored), as written.
V1_RESPONSES = """
CREATE TABLE responses (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cost_usd REAL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
"""
V1_COLUMNS = "key, text, model, prompt_tokens, completion_tokens, cost_usd, created_at"


def as_schema_1(path: Path) -> None:
    """Rewrite the cache at ``path`` as the previous nbllm wrote it (schema 1, WAL)."""
    rewrite_as_schema_1(path, table="responses", create=V1_RESPONSES, columns=V1_COLUMNS)


def cache_schema(path: Path) -> tuple[str, list[str]]:
    return schema_of(path, "responses")


def test_a_schema_1_cache_is_migrated_and_its_answers_are_used(tmp_path):
    """Every answer of the previous nbllm's cache is used (no request sent), with no
    finish_reason and no engine, which it never stored; new answers store theirs."""
    path = tmp_path / "cache.sqlite"
    data = dataset(4)
    engine, sent = recording_engine()
    options = {"engine": engine, "model": "m", "checkpoint": False, "progress": False}
    first = nbllm.run(data, cache=path, **options)
    as_schema_1(path)
    assert cache_schema(path) == ("1", V1_COLUMNS.split(", "))

    second = nbllm.run(data, cache=path, **options)
    assert len(sent) == n_turns(data)
    assert_all_cached(second)
    assert list(second.df["answer"]) == list(first.df["answer"])
    assert second.df["finish_reason"].isna().all()
    assert second.df["cached_tokens"].isna().all()
    added = ["engine", "finish_reason", "cached_tokens"]
    assert cache_schema(path) == ("3", [*V1_COLUMNS.split(", "), *added])

    more = dataset(4, question="new question")
    nbllm.run(more, cache=path, **options)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    keys = [key for (key,) in conn.execute("SELECT key FROM responses")]
    conn.close()
    cache = ResponseCache(path)
    try:
        hits = [cache.get(key) for key in keys]
    finally:
        cache.close()
    reasons = [hit.finish_reason for hit in hits if hit is not None]
    assert sorted(reasons, key=str) == [None] * n_turns(data) + ["stop"] * n_turns(more)
    assert all(hit.engine is None for hit in hits if hit is not None and hit.finish_reason is None)
