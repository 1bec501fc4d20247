"""``nbllm serve --metrics-port``: the server's queue, readiness, and a local engine's tokens
and batch sizes on /metrics, scraped over HTTP."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from typing import Any

import pytest
from embedded_model import require_embedded_model

from nbllm import metrics
from nbllm.engines import FakeEngine, OpenAIEngine, create_engine
from nbllm.serve import EngineServer
from nbllm.types import ChatRequest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        s.name + ("" if not s.labels else str(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def port():
    port = free_port()
    yield port
    exporter = metrics._exporters.get(("127.0.0.1", port))
    if exporter is not None:
        exporter.close()


def ask(text: str) -> ChatRequest:
    return ChatRequest("m", [{"role": "user", "content": text}], {"max_tokens": 8})


async def test_the_queue_and_readiness_while_requests_wait(port) -> None:
    release = asyncio.Event()

    async def handler(request: ChatRequest) -> str:
        await release.wait()
        return "ok"

    server = EngineServer(FakeEngine(handler), model="m")
    metrics.serve_metrics(server, port)
    async with server, OpenAIEngine(server.url) as client:
        asks = [asyncio.ensure_future(client.complete(ask(f"q{i}"))) for i in range(3)]
        for _ in range(100):
            await asyncio.sleep(0.02)
            if server.in_flight == 3:
                break
        during = await asyncio.to_thread(scrape, port)
        release.set()
        await asyncio.gather(*asks)
        after = await asyncio.to_thread(scrape, port)
    assert during["nbllm_serve_queue_depth"] == 3 and during["nbllm_serve_ready"] == 1
    assert during["nbllm_serve_max_queue"] == 256
    assert after["nbllm_serve_queue_depth"] == 0
    assert "nbllm_serve_generated_tokens_total" not in after  # no local engine: no tokens


async def test_a_local_engines_tokens_and_batch_sizes(port) -> None:
    require_embedded_model()
    engine: Any = create_engine("torch", model=None, worker=False, batch_size=4)
    server = EngineServer(engine, model="embedded")
    metrics.serve_metrics(server, port)
    async with server, OpenAIEngine(server.url) as client:
        for _ in range(600):
            if server.state.value == "ready":
                break
            await asyncio.sleep(0.1)
        answers = await asyncio.gather(*(client.complete(ask(f"Count to {i}")) for i in range(4)))
        after = await asyncio.to_thread(scrape, port)
    generated = sum(a.completion_tokens or 0 for a in answers)
    assert after["nbllm_serve_generated_tokens_total"] == generated > 0
    # The torch engine batches continuously: a "batch" is one token step of its rows.
    batches, sizes = engine._batcher.batches_run, engine._batcher.batch_sizes
    assert after["nbllm_serve_batch_size_count"] == batches >= 1
    assert after["nbllm_serve_batch_size_sum"] == sum(k * n for k, n in sizes.items())
    assert 1 <= max(sizes) <= 4  # never more rows than batch_size
    assert after["nbllm_serve_batch_size_bucket[('le', '+Inf')]"] == batches


def test_a_metrics_port_in_use_stops_serve_before_it_listens(capsys) -> None:
    from nbllm.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        code = main(["serve", "--engine", "fake", "--port", "0", "--metrics-port", str(busy)])
    assert code == 2
    assert f"metrics_port={busy}" in capsys.readouterr().err
