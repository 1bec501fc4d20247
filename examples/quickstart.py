"""Run a small financial-QA dataset of multi-turn conversations in parallel, on this machine.

No API key, no network, no GPU: the answers come from nbllm's embedded default model,
SmolLM2-135M-Instruct (a 135M-parameter instruct model, about 100 MB), on the CPU. It is
small, so expect fluent but often wrong figures; the point is the pipeline. The first
run converts the model once (about 10 s), with its own progress bar; later runs load it
in a second.

    python examples/quickstart.py
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import nbllm

DATA = Path(__file__).resolve().parent / "data" / "finqa_sample.jsonl"

SYSTEM = (
    "You answer questions about the financial text and table you are given. "
    "Reply with the number only."
)


def main() -> None:
    # With a provider instead: model="openai/gpt-4o-mini" (the key comes from
    # OPENAI_API_KEY); with an OpenAI-compatible server: api_base= and its model name.
    # Run it twice: the second run reads every answer back from its checkpoint.
    result = nbllm.run(DATA, system=SYSTEM, max_tokens=32)

    print(result.summary)
    print()
    with pd.option_context(
        "display.width", 160, "display.max_columns", None, "display.max_colwidth", 44
    ):
        print(result.df[["conversation_id", "turn", "question", "answer", "engine"]].head(8))


if __name__ == "__main__":
    main()
