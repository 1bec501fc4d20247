"""nbllm in a real Jupyter kernel (jupyter_client + ipykernel): a blocking run, then the
kernel's interrupt, then the next cell."""

from __future__ import annotations

import time

import pytest

jupyter_client = pytest.importorskip("jupyter_client.manager")


def _run(kc, code: str, timeout: float = 30.0) -> tuple[list[str], list[str]]:
    """Execute ``code``; the texts it printed and the names of errors it raised."""
    kc.execute(code)
    out: list[str] = []
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=timeout)
        kind = msg["msg_type"]
        if kind == "stream":
            out.append(msg["content"]["text"])
        elif kind == "error":
            errors.append(msg["content"]["ename"])
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            return out, errors
    pytest.fail(f"the cell did not finish within {timeout} s: {code!r}")


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    km, kc = jupyter_client.start_new_kernel(kernel_name="python3")
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _stream_until(kc, predicate, timeout: float) -> list[str]:
    """Read the kernel's messages until ``predicate(texts so far)``; fail after ``timeout``."""
    out: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.01))
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        if predicate(out, msg):
            return out
    pytest.fail(f"the kernel did not get there within {timeout} s; it printed {out!r}")


def _is_idle(msg: dict) -> bool:
    return msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"


def test_the_kernels_interrupt_stops_a_blocking_run_keeping_the_answers_in_flight(kernel):
    km, kc = kernel
    _run(
        kc,
        "import asyncio, nbllm\n"
        "async def slow(request):\n"
        "    await asyncio.sleep(0.3)\n"
        "    return 'ok'\n"
        "sent = []\n"
        "def report(event):\n"
        "    if type(event).__name__ == 'RequestSent':\n"
        "        sent.append(event)\n"
        "    if type(event).__name__ == 'TurnFinished':\n"
        "        print('TURN_FINISHED', flush=True)\n"
        "data = [{'id': i, 'turns': ['a', 'b', 'c']} for i in range(10)]",
    )
    kc.execute(
        "r = nbllm.run(data, engine=nbllm.FakeEngine(slow), model='m', concurrency=5,"
        " progress=False, checkpoint=False, cache=False, listeners=[report])\n"
        "print('RESULT', r.interrupted, r.summary.turns_ok, r.summary.turns, len(sent))"
    )
    # Interrupt once a turn has finished; the whole batch would take 1.8 s.
    _stream_until(kc, lambda out, msg: "TURN_FINISHED" in "".join(out), timeout=20)
    km.interrupt_kernel()
    out = _stream_until(kc, lambda out, msg: _is_idle(msg), timeout=20)
    (line,) = [text for text in "".join(out).splitlines() if text.startswith("RESULT")]
    _, interrupted, ok, total, sent = line.split()
    assert interrupted == "True"
    assert 0 < int(ok) < int(total) == 30
    assert ok == sent  # the requests in flight at the interrupt finished and were kept
    # The next cell runs: the kernel is healthy after the stopped batch.
    out, errors = _run(kc, "print('NEXT', r.summary.turns)")
    assert errors == []
    assert "".join(out).strip() == "NEXT 30"


def test_a_second_interrupt_cancels_the_requests_in_flight(kernel):
    km, kc = kernel
    _run(
        kc,
        "import asyncio, nbllm\n"
        "async def hangs(request):\n"
        "    if request.messages[-1]['content'] == 'b':\n"
        "        print('HANGING', flush=True)\n"
        "        await asyncio.sleep(60)\n"
        "    return 'ok'\n"
        "data = [{'id': i, 'turns': ['a', 'b']} for i in range(4)]",
    )
    kc.execute(
        "r = nbllm.run(data, engine=nbllm.FakeEngine(hangs), model='m', concurrency=4,"
        " progress=False, checkpoint=False, cache=False)\n"
        "print('RESULT', r.interrupted, r.summary.turns_ok, r.summary.turns_not_run)"
    )
    _stream_until(kc, lambda out, msg: "HANGING" in "".join(out), timeout=20)
    t0 = time.monotonic()
    km.interrupt_kernel()  # the requests in flight may finish, for up to 10 s...
    time.sleep(0.3)
    km.interrupt_kernel()  # ...but a second interrupt cancels them
    out = _stream_until(kc, lambda out, msg: _is_idle(msg), timeout=20)
    assert time.monotonic() - t0 < 8
    (line,) = [text for text in "".join(out).splitlines() if text.startswith("RESULT")]
    assert line.split()[1:] == ["True", "4", "4"]
    out, errors = _run(kc, "print('NEXT', r.summary.turns)")
    assert errors == [] and "".join(out).strip() == "NEXT 8"
