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


def test_the_kernels_interrupt_stops_a_blocking_run_and_the_kernel_stays_healthy(kernel):
    km, kc = kernel
    _run(
        kc,
        "import asyncio, nbllm\n"
        "async def slow(request):\n"
        "    await asyncio.sleep(0.3)\n"
        "    return 'ok'\n"
        "data = [{'id': i, 'turns': ['a', 'b', 'c']} for i in range(10)]",
    )
    kc.execute(
        "r = nbllm.run(data, engine=nbllm.FakeEngine(slow), model='m', concurrency=5,"
        " progress=False, checkpoint=False, cache=False)\n"
        "print('RESULT', r.interrupted, r.summary.turns_ok, r.summary.turns)"
    )
    time.sleep(1.5)  # a few turns finish; the whole batch would take 1.8 s more
    km.interrupt_kernel()
    out: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=20)
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    (line,) = [text for text in out if text.startswith("RESULT")]
    _, interrupted, ok, total = line.split()
    assert interrupted == "True"
    assert 0 < int(ok) < int(total) == 30
    # The next cell runs: the kernel is healthy after the stopped batch.
    out, errors = _run(kc, "print('NEXT', r.summary.turns)")
    assert errors == []
    assert "".join(out).strip() == "NEXT 30"
