"""Run a small financial-QA dataset of multi-turn conversations in parallel.

Everything stays on this machine: the answers come from nbllm's test server, an
OpenAI-compatible HTTP server on 127.0.0.1 (no API key, no network, no GPU).

    python examples/quickstart.py
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import nbllm
from nbllm.testing import TestServer

DATA = Path(__file__).resolve().parent / "data" / "finqa_sample.jsonl"

SYSTEM = (
    "You answer questions about the financial text and table you are given. "
    "Reply with the number only."
)


def main() -> None:
    # Each answer takes 50-200 ms, like a small hosted model.
    with TestServer(latency=(0.05, 0.2)) as server:
        # With a real provider: model="openai/gpt-4o-mini" and no api_base
        # (the key comes from OPENAI_API_KEY).
        result = nbllm.run(
            DATA,
            model="nbllm-test",
            api_base=server.url,
            concurrency=8,
            rpm=600,
            system=SYSTEM,
        )

    print(result.summary)
    print()
    with pd.option_context(
        "display.width", 160, "display.max_columns", None, "display.max_colwidth", 44
    ):
        print(result.df[["conversation_id", "turn", "question", "answer", "latency_s"]].head(8))


if __name__ == "__main__":
    main()
