"""Several endpoints for one model: a deployment that fails, a fallback, and a hard budget.

Three test servers stand for three deployments: two of group "main" (one of them answers
every request with a 500, as a broken replica does) and one of group "backup". nbllm's
router spreads the turns over a group, opens the broken deployment's circuit breaker after
two failures in a row, retries those turns elsewhere with the same history, sends a group's
turns to its fallback when the whole group is down, and stops new requests once a budget is
spent. No key, no network. (The flow of
notebooks/03-providers-and-routing.ipynb.)

    python examples/providers_and_routing.py
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

import nbllm
from nbllm.testing import TestServer

DATA = Path(__file__).resolve().parent / "data" / "finqa_sample.jsonl"
QUICK_RETRIES = nbllm.RetryPolicy(retries=3, initial=0.01, maximum=0.05)  # an example: no waits
EXAMPLE = {"progress": False, "checkpoint": False, "cache": False}


def deployment(group: str, server: TestServer) -> dict[str, object]:
    """One entry of a deployment list, in litellm's model_list format (a YAML file works too)."""
    return {
        "model_name": group,
        "litellm_params": {
            "model": "openai/finqa-model",
            "api_base": server.url,
            # A real provider's price comes from litellm's table; a server of your own has
            # none, so say it: max_cost_usd= needs a price.
            "cost_per_1k_tokens": 0.5,
        },
    }


def main() -> None:
    # shared_history: the servers stand for one model, so a conversation may move between
    # them from one turn to the next.
    with (
        TestServer(latency=0.01, shared_history=True) as good,
        TestServer(shared_history=True, faults={"server_error": 1.0}) as broken,
        TestServer(latency=0.01, shared_history=True) as backup,
    ):
        result = nbllm.run(
            DATA,
            model="main",  # the group asked
            router=[deployment("main", good), deployment("main", broken)],
            allowed_fails=2,  # failures in a row that open a breaker...
            cooldown_s=60,  # ...which then sends that deployment nothing for 60 s
            concurrency=4,
            retries=QUICK_RETRIES,
            **EXAMPLE,
        )
        print(result.verdict)
        table = result.summary.deployments
        broken_id = f"finqa-model@{broken.url.split('/')[2]}"
        row = table.set_index("deployment").loc[broken_id]
        print(f"broken deployment: {row['errors']} errors, breaker {row['breaker']}")
        print(
            "turns answered by the broken one:", int((result.df["deployment"] == broken_id).sum())
        )
        with pd.option_context("display.width", 120, "display.max_columns", None):
            print(table[["group", "requests", "errors", "breaker"]].to_string(index=False))

        # When every deployment of "main" is down, its turns go to the fallback group.
        fallen = nbllm.run(
            DATA,
            model="main",
            router=[deployment("main", broken), deployment("backup", backup)],
            fallbacks=[{"main": ["backup"]}],
            allowed_fails=2,
            cooldown_s=60,
            concurrency=4,
            retries=QUICK_RETRIES,
            **EXAMPLE,
        )
        print(fallen.verdict)
        backup_id = f"finqa-model@{backup.url.split('/')[2]}"
        print("turns answered by the backup:", int((fallen.df["deployment"] == backup_id).sum()))

        # A hard budget: no new request once the answers have cost $0.50. The requests in
        # flight finish; the rest are "not run", and the same call with a higher cap would
        # resume from the checkpoint.
        capped = nbllm.run(
            DATA,
            model="main",
            router=[deployment("main", good)],
            max_cost_usd=0.5,
            concurrency=2,  # the overshoot is at most what is in flight
            **EXAMPLE,
        )
        print(capped.verdict)
        print(f"spent ${capped.summary.cost_usd:.2f} of a $0.50 cap")

    # With real providers, the same list names them (keys as os.environ/VAR, never in a file):
    #   {"model_name": "main", "litellm_params": {"model": "openai/gpt-4o-mini"}},
    #   {"model_name": "backup", "litellm_params": {"model": "anthropic/claude-3-5-haiku-latest"}}


if __name__ == "__main__":
    main()
