"""A provider's batch API: the same run at about half the price, for jobs nobody waits for.

With batch_api=True nbllm uploads every conversation's turn 0 as one batch, waits for it,
then sends the turns that follow in the next batch ("waves"), and checkpoints each batch's
id the moment it exists, so a stopped run picks its batches up again. nbllm's test server
runs batches as OpenAI's Batch API does, after batch_delay_s instead of hours. No key, no
network.

    python examples/batch_api.py
"""

from __future__ import annotations

from pathlib import Path

import nbllm
from nbllm.testing import TestServer

DATA = Path(__file__).resolve().parent / "data" / "finqa_sample.jsonl"


def main() -> None:
    # Each batch ends 0.2 s after it is created (a real one: minutes to 24 hours).
    with TestServer(batch_delay_s=0.2) as server:
        result = nbllm.run(
            DATA,
            model="nbllm-test",
            api_base=server.url,
            batch_api=True,
            batch_poll_s=0.05,  # how often each batch is asked about (default 30 s)
            progress=False,
            cache=False,
        )
        stats = server.stats()
    print(result.verdict)
    print(f"batches: {stats['batches_created']}, lines in them: {stats['batch_lines']}")
    print(f"live requests: {stats['total']}")  # none: every turn went through a batch
    longest = result.df.groupby("conversation_id").size().max()
    print(f"the longest conversation has {longest} turns: one wave each")
    print("engine:", ", ".join(sorted(set(result.df["engine"]))))

    # In a notebook, for a real provider, run it in the background and come back later:
    #   job = nbllm.submit(DATA, model="openai/gpt-4o-mini", batch_api=True)
    #   job.result()                         # or, after a restart: nbllm.runs.resume(run_id)
    # Rows carry cost_usd at the batch price and saved_usd, what the batch saved.


if __name__ == "__main__":
    main()
