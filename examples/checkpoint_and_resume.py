"""Checkpoints: a run that stopped half-way is resumed, and nothing finished is asked twice.

Every answered turn is written to the run's checkpoint (an SQLite file under $NBLLM_DIR, or
./.nbllm) the moment it arrives. Running the same call again reads those turns back and asks
only for the rest. Here a token budget stops the first run part-way, as a crash or Ctrl-C
would; the answers come from nbllm's test server (no key, no network). (The flow of
notebooks/04-checkpoint-and-resume.ipynb.)

    python examples/checkpoint_and_resume.py
"""

from __future__ import annotations

from pathlib import Path

import nbllm
from nbllm.testing import TestServer

DATA = Path(__file__).resolve().parent / "data" / "finqa_sample.jsonl"


def resumed(result: nbllm.RunResult, server: TestServer) -> None:
    """How many turns came back from the checkpoint, how many requests the server saw."""
    print(f"  resumed {result.summary.resumed} turns, requests sent: {len(server.requests)}")


def main() -> None:
    with TestServer(latency=0.01) as server:
        # cache=False: this example shows the checkpoint alone. concurrency=2 keeps the
        # overshoot past the budget small.
        options = {"model": "nbllm-test", "api_base": server.url, "progress": False}
        options |= {"cache": False, "concurrency": 2}

        # 1. Stopped part-way: here by a budget of 1,500 tokens.
        first = nbllm.run(DATA, max_tokens_total=1_500, **options)
        print("first run: ", first.verdict)
        print("  requests sent:", len(server.requests))

        # 2. The same call (the cap is not part of what identifies the run): the finished
        #    turns come back from the checkpoint, only the rest is sent.
        server.reset()  # forget the request log, so the count below is this run's
        second = nbllm.run(DATA, **options)
        print("second run:", second.verdict)
        resumed(second, server)

        # 3. Once more: everything is in the checkpoint, nothing is sent.
        server.reset()
        third = nbllm.run(DATA, **options)
        print("third run: ", third.verdict)
        resumed(third, server)

        # resume=False starts the run over in the same file.

    # Stored runs: list them, and remove one when you no longer need it (`nbllm runs` and
    # `nbllm runs rm ID` do the same in a terminal).
    runs = nbllm.runs.list_runs()
    print(runs[["id", "model", "done", "total"]].to_string(index=False))
    nbllm.runs.remove(runs["id"].iloc[0])
    print("runs left:", len(nbllm.runs.list_runs()))


if __name__ == "__main__":
    main()
