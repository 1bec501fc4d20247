"""What a batch answer costs, from litellm's price table: the batch price where the table
has one (``input_cost_per_token_batches``, ``output_cost_per_token_batches``), else the
live price; and what it saved against the live price (None where the table has no batch
price, since the saving is then not known)."""

from __future__ import annotations

from dataclasses import dataclass

from nbllm.engines.litellm import import_litellm

__all__ = ["DEFAULT_MAX_OUTPUT", "Prices", "prices_of"]

#: Answer tokens a request without max_tokens is counted as able to take, where the price
#: table does not say the model's own limit.
DEFAULT_MAX_OUTPUT = 4096


@dataclass(frozen=True, slots=True)
class Prices:
    """Dollars per token: live, and in a batch (None where the table has none)."""

    input: float
    output: float
    batch_input: float | None = None
    batch_output: float | None = None
    max_output: int = DEFAULT_MAX_OUTPUT

    def of(self, prompt: int | None, completion: int | None) -> tuple[float, float | None]:
        """(cost, saving against the live price) of an answer with these tokens."""
        p, c = prompt or 0, completion or 0
        live = p * self.input + c * self.output
        if self.batch_input is None or self.batch_output is None:
            return live, None
        cost = p * self.batch_input + c * self.batch_output
        return cost, live - cost


def prices_of(model: str) -> Prices | None:
    """The prices of a litellm model string, or None when the table does not know it."""
    table = import_litellm().model_cost
    name = model.split("/", 1)[1] if "/" in model else model
    entry = table.get(model) or table.get(name)
    if not isinstance(entry, dict):
        return None
    live_in, live_out = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
    if not isinstance(live_in, (int, float)) or not isinstance(live_out, (int, float)):
        return None
    batch_in = entry.get("input_cost_per_token_batches")
    batch_out = entry.get("output_cost_per_token_batches")
    both = isinstance(batch_in, (int, float)) and isinstance(batch_out, (int, float))
    most = entry.get("max_output_tokens")
    return Prices(
        float(live_in),
        float(live_out),
        float(batch_in) if both else None,  # type: ignore[arg-type]
        float(batch_out) if both else None,  # type: ignore[arg-type]
        most if isinstance(most, int) and most > 0 else DEFAULT_MAX_OUTPUT,
    )
