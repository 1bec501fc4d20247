"""Tests for the test server's batch routes: OpenAI's Files and Batch API and Anthropic's
Message Batches, spoken over real HTTP with plain aiohttp."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from nbllm.errors import ConfigError
from nbllm.testing import TestServer
from nbllm.testing.__main__ import build_parser
from nbllm.testing.launcher import _cli_args

DELAY = 0.05
OPENAI_ENDED = ("completed", "expired", "cancelled", "failed")


def chat_line(custom_id: str, messages: list[dict[str, Any]], **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": messages, **body},
    }


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


async def upload(session: aiohttp.ClientSession, url: str, lines: list[Any]) -> dict[str, Any]:
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", text.encode(), filename="in.jsonl", content_type="application/jsonl")
    async with session.post(url + "/files", data=form) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def create(
    session: aiohttp.ClientSession, url: str, lines: list[Any], **extra: Any
) -> dict[str, Any]:
    stored = await upload(session, url, lines)
    body = {
        "input_file_id": stored["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        **extra,
    }
    async with session.post(url + "/batches", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def wait_for(
    session: aiohttp.ClientSession, url: str, done: Any, deadline_s: float = 5.0
) -> dict[str, Any]:
    """GET ``url`` every 10 ms until ``done(body)``."""
    end = time.monotonic() + deadline_s
    while True:
        status, body = await get_json(session, url)
        assert status == 200, body
        if done(body):
            return body
        assert time.monotonic() < end, f"not done within {deadline_s} s: {body}"
        await asyncio.sleep(0.01)


async def finished(session: aiohttp.ClientSession, url: str, batch_id: str) -> dict[str, Any]:
    return await wait_for(
        session, f"{url}/batches/{batch_id}", lambda b: b["status"] in OPENAI_ENDED
    )


async def file_lines(
    session: aiohttp.ClientSession, url: str, file_id: str | None
) -> list[dict[str, Any]]:
    assert file_id is not None
    async with session.get(f"{url}/files/{file_id}/content") as resp:
        assert resp.status == 200
        return [json.loads(line) for line in (await resp.text()).splitlines()]


# --------------------------------------------------------------------------- OpenAI


async def test_a_batch_runs_to_completed_and_its_output_file_holds_the_answers() -> None:
    async with TestServer(batch_delay_s=DELAY) as server, aiohttp.ClientSession() as session:
        lines = [chat_line("a", [user("What is 2 + 2?")]), chat_line("b", [user("Hi")])]
        batch = await create(session, server.url, lines, metadata={"run": "r1"})
        assert batch["object"] == "batch" and batch["id"].startswith("batch_")
        assert batch["status"] == "validating" and batch["metadata"] == {"run": "r1"}
        assert batch["expires_at"] == batch["created_at"] + 24 * 3600
        done = await finished(session, server.url, batch["id"])
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
        for name in ("in_progress_at", "finalizing_at", "completed_at"):
            assert isinstance(done[name], int), name
        assert done["failed_at"] is None and done["cancelled_at"] is None
        assert done["error_file_id"] is None and done["errors"] is None
        out = await file_lines(session, server.url, done["output_file_id"])
        assert [line["custom_id"] for line in out] == ["a", "b"]  # file order
        first = out[0]
        assert first["id"].startswith("batch_req_") and first["error"] is None
        assert first["response"]["status_code"] == 200 and first["response"]["request_id"]
        completion = first["response"]["body"]
        assert completion["object"] == "chat.completion" and completion["model"] == "m"
        assert completion["choices"][0]["message"]["content"].startswith(
            "Answer to turn 0: What is 2 + 2?"
        )
        status, meta = await get_json(session, f"{server.url}/files/{done['output_file_id']}")
        assert status == 200 and meta["purpose"] == "batch_output"
    assert server.requests == []  # batch lines are not live requests
    assert [(e.conversation, e.status, e.turn) for e in server.batch_requests] == [
        ("a", 200, 0),
        ("b", 200, 0),
    ]
    [record] = server.batches
    assert (record.id, record.api, record.n_lines, record.status) == (
        batch["id"],
        "openai",
        2,
        "completed",
    )
    stats = server.stats()
    assert stats["total"] == 0 and stats["batches_created"] == 1
    assert stats["files_uploaded"] == 1 and stats["batch_lines"] == 2
    assert stats["batches_cancelled"] == 0


async def test_a_second_turn_in_a_later_batch_passes_the_history_check_and_a_forged_one_fails() -> (
    None
):
    async with TestServer(batch_delay_s=DELAY) as server, aiohttp.ClientSession() as session:
        first = await create(session, server.url, [chat_line("c1", [user("Name a colour")])])
        done = await finished(session, server.url, first["id"])
        [line] = await file_lines(session, server.url, done["output_file_id"])
        answer = line["response"]["body"]["choices"][0]["message"]["content"]

        real = [user("Name a colour"), {"role": "assistant", "content": answer}, user("Another")]
        forged = [*real[:1], {"role": "assistant", "content": "made up"}, real[2]]
        second = await create(
            session, server.url, [chat_line("good", real), chat_line("bad", forged)]
        )
        done = await finished(session, server.url, second["id"])
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
        [ok] = await file_lines(session, server.url, done["output_file_id"])
        assert ok["custom_id"] == "good"
        assert ok["response"]["body"]["choices"][0]["message"]["content"].startswith(
            "Answer to turn 1: Another"
        )
        [bad] = await file_lines(session, server.url, done["error_file_id"])
        assert bad["custom_id"] == "bad" and bad["error"] is None
        assert bad["response"]["status_code"] == 400
        assert "history mismatch" in bad["response"]["body"]["error"]["message"]

        # The batch's answer is a history the live route accepts too.
        live = {"model": "m", "messages": [*real, ok["response"]["body"]["choices"][0]["message"]]}
        live["messages"].append(user("A third"))
        async with session.post(server.url + "/chat/completions", json=live) as resp:
            assert resp.status == 200, await resp.text()
    assert server.history_errors == 1
    assert [e.status for e in server.requests] == [200]


async def test_a_batch_over_the_limit_fails_with_a_message_naming_the_limit() -> None:
    async with TestServer(batch_max_requests=2) as server, aiohttp.ClientSession() as session:
        lines = [chat_line(f"r{i}", [user(f"q{i}")]) for i in range(3)]
        batch = await create(session, server.url, lines)
        assert batch["status"] == "failed" and isinstance(batch["failed_at"], int)
        [error] = batch["errors"]["data"]
        assert "limit of 2 requests per batch" in error["message"]
        assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
        await asyncio.sleep(DELAY)
        assert (await finished(session, server.url, batch["id"]))["status"] == "failed"
    assert server.batch_requests == []
    assert [b.status for b in server.batches] == ["failed"]


async def test_invalid_lines_fail_the_batch_with_one_error_per_line() -> None:
    async with TestServer() as server, aiohttp.ClientSession() as session:
        wrong_url = {**chat_line("c", [user("x")]), "url": "/v1/embeddings"}
        lines = [chat_line("a", [user("x")]), "{not json", chat_line("a", [user("y")]), wrong_url]
        batch = await create(session, server.url, lines)
        assert batch["status"] == "failed"
        errors = batch["errors"]["data"]
        assert [(e["code"], e["line"]) for e in errors] == [
            ("invalid_json_line", 2),
            ("duplicate_custom_id", 3),
            ("invalid_url", 4),
        ]
        assert batch["errors"]["object"] == "list"


async def test_batch_fail_first_sends_the_first_lines_to_the_error_file_with_a_500() -> None:
    async with (
        TestServer(batch_delay_s=DELAY, batch_fail_first=1) as server,
        aiohttp.ClientSession() as session,
    ):
        lines = [chat_line(f"r{i}", [user(f"q{i}")]) for i in range(3)]
        batch = await create(session, server.url, lines)
        done = await finished(session, server.url, batch["id"])
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
        [failed] = await file_lines(session, server.url, done["error_file_id"])
        assert failed["custom_id"] == "r0" and failed["response"]["status_code"] == 500
        assert failed["response"]["body"]["error"]["type"] == "server_error"
        out = await file_lines(session, server.url, done["output_file_id"])
        assert [line["custom_id"] for line in out] == ["r1", "r2"]
    assert [e.status for e in server.batch_requests] == [500, 200, 200]


async def test_an_expired_batch_answers_half_its_lines_and_reports_the_rest_expired() -> None:
    async with (
        TestServer(batch_delay_s=DELAY, batch_expire_first=1) as server,
        aiohttp.ClientSession() as session,
    ):
        lines = [chat_line(f"r{i}", [user(f"q{i}")]) for i in range(5)]
        batch = await create(session, server.url, lines)
        done = await finished(session, server.url, batch["id"])
        assert done["status"] == "expired" and isinstance(done["expired_at"], int)
        assert done["request_counts"] == {"total": 5, "completed": 2, "failed": 3}
        out = await file_lines(session, server.url, done["output_file_id"])
        assert [line["custom_id"] for line in out] == ["r0", "r1"]
        expired = await file_lines(session, server.url, done["error_file_id"])
        assert [line["custom_id"] for line in expired] == ["r2", "r3", "r4"]
        assert expired[0]["response"] is None
        assert expired[0]["error"] == {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        }
        # Only the first batch expires.
        again = await create(session, server.url, lines[:1])
        assert (await finished(session, server.url, again["id"]))["status"] == "completed"
    assert len(server.batch_requests) == 3


async def test_a_cancelled_batch_answers_nothing_and_a_finished_one_cannot_be_cancelled() -> None:
    async with TestServer(batch_delay_s=30.0) as server, aiohttp.ClientSession() as session:
        batch = await create(session, server.url, [chat_line("a", [user("x")])])
        async with session.post(f"{server.url}/batches/{batch['id']}/cancel") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "cancelling"
        done = await finished(session, server.url, batch["id"])
        assert done["status"] == "cancelled"
        assert isinstance(done["cancelling_at"], int) and isinstance(done["cancelled_at"], int)
        assert done["request_counts"] == {"total": 1, "completed": 0, "failed": 0}
        assert done["output_file_id"] is None and done["error_file_id"] is None
        async with session.post(f"{server.url}/batches/{batch['id']}/cancel") as resp:
            assert resp.status == 400
            body = await resp.json()
            assert body["error"]["message"] == "Cannot cancel a batch with status 'cancelled'."
    assert server.batch_requests == []
    assert server.stats()["batches_cancelled"] == 1


async def test_batches_are_listed_newest_first_a_page_at_a_time() -> None:
    async with TestServer(batch_delay_s=DELAY) as server, aiohttp.ClientSession() as session:
        ids = [
            (await create(session, server.url, [chat_line("a", [user(str(i))])]))["id"]
            for i in range(3)
        ]
        status, page = await get_json(session, f"{server.url}/batches?limit=2")
        assert status == 200 and page["object"] == "list"
        assert [b["id"] for b in page["data"]] == ids[::-1][:2]
        assert page["first_id"] == ids[2] and page["last_id"] == ids[1] and page["has_more"]
        status, rest = await get_json(session, f"{server.url}/batches?limit=2&after={ids[1]}")
        assert [b["id"] for b in rest["data"]] == ids[:1] and not rest["has_more"]
        for batch_id in ids:
            await finished(session, server.url, batch_id)


async def test_files_can_be_read_back_and_deleted_and_unknown_ids_are_404() -> None:
    async with TestServer() as server, aiohttp.ClientSession() as session:
        stored = await upload(session, server.url, [chat_line("a", [user("x")])])
        assert stored["object"] == "file" and stored["id"].startswith("file-")
        assert stored["purpose"] == "batch" and stored["filename"] == "in.jsonl"
        async with session.get(f"{server.url}/files/{stored['id']}/content") as resp:
            assert len(await resp.read()) == stored["bytes"]
        async with session.delete(f"{server.url}/files/{stored['id']}") as resp:
            assert await resp.json() == {"id": stored["id"], "object": "file", "deleted": True}
        status, body = await get_json(session, f"{server.url}/files/{stored['id']}")
        assert status == 404 and body["error"]["type"] == "invalid_request_error"
        status, body = await get_json(session, f"{server.url}/batches/batch_nope")
        assert status == 404 and "batch_nope" in body["error"]["message"]
        form = aiohttp.FormData()
        form.add_field("file", b"{}\n", filename="x.jsonl")
        async with session.post(server.url + "/files", data=form) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "purpose"


async def test_a_line_the_chat_route_would_refuse_lands_in_the_error_file() -> None:
    async with TestServer(batch_delay_s=DELAY) as server, aiohttp.ClientSession() as session:
        batch = await create(session, server.url, [chat_line("a", [{"content": "no role"}])])
        done = await finished(session, server.url, batch["id"])
        [line] = await file_lines(session, server.url, done["error_file_id"])
        assert line["response"]["status_code"] == 400


async def test_batch_routes_want_the_api_key() -> None:
    async with TestServer(api_key="k") as server, aiohttp.ClientSession() as session:
        status, body = await get_json(session, f"{server.url}/batches")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        async with session.post(f"{server.url}/files", data=b"") as resp:
            assert resp.status == 401
        async with session.get(
            f"{server.url}/batches", headers={"Authorization": "Bearer k"}
        ) as resp:
            assert resp.status == 200
        async with session.post(
            f"{server.url}/messages/batches", json={"requests": []}, headers={"x-api-key": "no"}
        ) as resp:
            assert resp.status == 401
            body = await resp.json()
            assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
        async with session.get(
            f"{server.url}/messages/batches", headers={"x-api-key": "k"}
        ) as resp:
            assert resp.status == 200


# --------------------------------------------------------------------------- Anthropic


def params(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": "claude-test", "max_tokens": 256, "messages": messages, **extra}


async def create_anthropic(
    session: aiohttp.ClientSession, url: str, requests: list[dict[str, Any]]
) -> dict[str, Any]:
    async with session.post(url + "/messages/batches", json={"requests": requests}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def ended(session: aiohttp.ClientSession, url: str, batch_id: str) -> dict[str, Any]:
    return await wait_for(
        session,
        f"{url}/messages/batches/{batch_id}",
        lambda b: b["processing_status"] == "ended",
    )


async def results(session: aiohttp.ClientSession, batch: dict[str, Any]) -> list[dict[str, Any]]:
    async with session.get(batch["results_url"]) as resp:
        assert resp.status == 200
        return [json.loads(line) for line in (await resp.text()).splitlines()]


async def test_an_anthropic_batch_answers_with_messages_and_keeps_histories() -> None:
    async with TestServer(batch_delay_s=DELAY) as server, aiohttp.ClientSession() as session:
        system = [{"type": "text", "text": "Be brief."}]
        blocks = [{"type": "text", "text": "What is 2 + 2?"}]
        batch = await create_anthropic(
            session,
            server.url,
            [
                {"custom_id": "a", "params": params([user("Hi")], system="Be brief.")},
                {"custom_id": "b", "params": params([{"role": "user", "content": blocks}])},
                {"custom_id": "c", "params": params([user("Long")], max_tokens=2)},
                {"custom_id": "d", "params": {"model": "x", "messages": [user("no max")]}},
                {"custom_id": "e", "params": params([user("sys")], system=system)},
            ],
        )
        assert batch["type"] == "message_batch" and batch["id"].startswith("msgbatch_")
        assert batch["processing_status"] == "in_progress" and batch["results_url"] is None
        assert batch["created_at"].endswith("Z") and batch["request_counts"]["processing"] == 5
        async with session.get(f"{server.url}/messages/batches/{batch['id']}/results") as resp:
            assert resp.status == 400  # not ended yet
        done = await ended(session, server.url, batch["id"])
        assert done["request_counts"] == {
            "processing": 0,
            "succeeded": 4,
            "errored": 1,
            "canceled": 0,
            "expired": 0,
        }
        assert done["ended_at"].endswith("Z") and done["cancel_initiated_at"] is None
        got = {r["custom_id"]: r["result"] for r in await results(session, done)}
        assert list(got) == ["a", "b", "c", "d", "e"]
        message = got["b"]["message"]
        assert got["b"]["type"] == "succeeded" and message["type"] == "message"
        assert message["role"] == "assistant" and message["model"] == "claude-test"
        assert message["stop_reason"] == "end_turn" and message["stop_sequence"] is None
        [content] = message["content"]
        assert content["text"].startswith("Answer to turn 0: What is 2 + 2?")
        assert set(message["usage"]) == {"input_tokens", "output_tokens"}
        assert got["c"]["message"]["stop_reason"] == "max_tokens"
        assert got["d"]["type"] == "errored"
        assert got["d"]["error"]["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in got["d"]["error"]["error"]["message"]

        # Turn 2 of conversation "e" in a later batch (the answer as blocks), and live.
        answer = got["e"]["message"]["content"]
        turn2 = [user("sys"), {"role": "assistant", "content": answer}, user("And then?")]
        forged = [user("sys"), {"role": "assistant", "content": "made up"}, user("And then?")]
        second = await create_anthropic(
            session,
            server.url,
            [
                {"custom_id": "e2", "params": params(turn2, system=system)},
                {"custom_id": "forged", "params": params(forged, system=system)},
            ],
        )
        done = await ended(session, server.url, second["id"])
        got = {r["custom_id"]: r["result"] for r in await results(session, done)}
        assert got["e2"]["type"] == "succeeded", got["e2"]
        assert got["e2"]["message"]["content"][0]["text"].startswith("Answer to turn 1: And then?")
        assert got["forged"]["error"]["error"]["message"] == "history mismatch at message 2"
        live = [
            {"role": "system", "content": "Be brief."},
            user("sys"),
            {"role": "assistant", "content": answer[0]["text"]},
            user("Live now"),
        ]
        body = {"model": "m", "messages": live}
        async with session.post(server.url + "/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
    assert server.history_errors == 1
    assert [b.api for b in server.batches] == ["anthropic", "anthropic"]
    assert len(server.batch_requests) == 7 and len(server.requests) == 1


async def test_anthropic_expiry_cancel_limit_and_listing() -> None:
    async with (
        TestServer(batch_delay_s=DELAY, batch_expire_first=1, batch_max_requests=4) as server,
        aiohttp.ClientSession() as session,
    ):
        requests = [{"custom_id": f"r{i}", "params": params([user(f"q{i}")])} for i in range(4)]
        batch = await create_anthropic(session, server.url, requests)
        done = await ended(session, server.url, batch["id"])
        counts = done["request_counts"]
        assert (counts["succeeded"], counts["expired"]) == (2, 2)
        kinds = [r["result"]["type"] for r in await results(session, done)]
        assert kinds == ["succeeded", "succeeded", "expired", "expired"]

        async with session.post(
            server.url + "/messages/batches", json={"requests": [*requests, requests[0]]}
        ) as resp:
            assert resp.status == 400
            body = await resp.json()
            assert body["error"]["type"] == "invalid_request_error"
            assert "limit of 4 requests per batch" in body["error"]["message"]

        server_url = server.url
        cancelled = await create_anthropic(session, server_url, requests[:2])
        cancel_url = f"{server_url}/messages/batches/{cancelled['id']}/cancel"
        async with session.post(cancel_url) as resp:
            body = await resp.json()
            assert body["processing_status"] == "canceling" and body["cancel_initiated_at"]
        done = await ended(session, server_url, cancelled["id"])
        assert done["request_counts"]["canceled"] == 2
        kinds = [r["result"]["type"] for r in await results(session, done)]
        assert kinds == ["canceled", "canceled"]
        async with session.post(cancel_url) as resp:
            assert resp.status == 400

        status, page = await get_json(session, f"{server_url}/messages/batches?limit=1")
        assert status == 200 and [b["id"] for b in page["data"]] == [cancelled["id"]]
        assert page["has_more"]
        status, body = await get_json(session, f"{server_url}/messages/batches/msgbatch_nope")
        assert status == 404 and body["error"]["type"] == "not_found_error"
    assert [b.status for b in server.batches] == ["expired", "cancelled"]


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("batch_delay_s", -1),
        ("batch_max_requests", 0),
        ("batch_fail_first", -1),
        ("batch_expire_first", 1.5),
    ],
)
def test_bad_batch_options_are_refused_naming_the_option(option: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=option):
        TestServer(**{option: value})


def test_batch_options_reach_the_command_line() -> None:
    options = {
        "batch_delay_s": 0.5,
        "batch_max_requests": 10,
        "batch_fail_first": 2,
        "batch_expire_first": 1,
    }
    parsed = build_parser().parse_args(_cli_args(options))
    assert parsed.batch_delay == 0.5 and parsed.batch_max_requests == 10
    assert parsed.batch_fail_first == 2 and parsed.batch_expire_first == 1


async def test_reset_clears_the_batch_logs_but_batches_stay_readable() -> None:
    async with TestServer(batch_delay_s=DELAY) as server, aiohttp.ClientSession() as session:
        batch = await create(session, server.url, [chat_line("a", [user("x")])])
        await finished(session, server.url, batch["id"])
        server.reset()
        assert server.batches == [] and server.batch_requests == []
        stats = server.stats()
        assert stats["batches_created"] == stats["batch_lines"] == stats["files_uploaded"] == 0
        status, body = await get_json(session, f"{server.url}/batches/{batch['id']}")
        assert status == 200 and body["status"] == "completed"


async def test_the_openai_client_runs_a_batch_end_to_end() -> None:
    openai = pytest.importorskip("openai")
    async with TestServer(batch_delay_s=DELAY, api_key="k") as server:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="k", max_retries=0)
        async with client:
            text = json.dumps(chat_line("a", [user("What is 2 + 2?")])) + "\n"
            stored = await client.files.create(file=("in.jsonl", text.encode()), purpose="batch")
            batch = await client.batches.create(
                input_file_id=stored.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
            end = time.monotonic() + 5.0
            while batch.status not in OPENAI_ENDED:
                assert time.monotonic() < end, batch
                await asyncio.sleep(0.01)
                batch = await client.batches.retrieve(batch.id)
            assert batch.status == "completed" and batch.request_counts is not None
            assert batch.request_counts.completed == 1 and batch.output_file_id is not None
            content = await client.files.content(batch.output_file_id)
            [line] = [json.loads(x) for x in content.text.splitlines()]
            assert line["custom_id"] == "a" and line["response"]["status_code"] == 200
            page = await client.batches.list(limit=5)
            assert [b.id for b in page.data] == [batch.id]
            deleted = await client.files.delete(stored.id)
            assert deleted.deleted


async def test_stopping_the_server_with_a_batch_still_waiting_is_quiet() -> None:
    async with TestServer(batch_delay_s=30.0) as server, aiohttp.ClientSession() as session:
        batch = await create(session, server.url, [chat_line("a", [user("x")])])
        await wait_for(
            session, f"{server.url}/batches/{batch['id']}", lambda b: b["status"] == "in_progress"
        )
    assert server.batch_requests == []
