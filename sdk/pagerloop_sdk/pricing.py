"""USD prices per 1M tokens (the seed's table, with OpenAI's cached-input prices).

Dated snapshots are priced as their base model; an unknown model has no price (its cost is
recorded as unknown and counted, never guessed). `PAGERLOOP_PRICES_FILE` (TOML) overrides or
adds models:

    [models."gpt-4.1"]
    input = 2.00
    cached_input = 0.50
    output = 8.00
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelPrice:
    input: float
    cached_input: float
    output: float


PRICES: dict[str, ModelPrice] = {
    "gpt-4.1": ModelPrice(input=2.00, cached_input=0.50, output=8.00),
    "gpt-4.1-mini": ModelPrice(input=0.40, cached_input=0.10, output=1.60),
    "gpt-4.1-nano": ModelPrice(input=0.10, cached_input=0.025, output=0.40),
    "o3": ModelPrice(input=2.00, cached_input=0.50, output=8.00),
    "o4-mini": ModelPrice(input=1.10, cached_input=0.275, output=4.40),
    "text-embedding-3-small": ModelPrice(input=0.02, cached_input=0.02, output=0.0),
    "text-embedding-3-large": ModelPrice(input=0.13, cached_input=0.13, output=0.0),
}

_SNAPSHOT_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


class PriceFileError(ValueError):
    pass


def base_model(model: str) -> str:
    """`gpt-4.1-2025-04-14` is priced as `gpt-4.1`."""
    return _SNAPSHOT_SUFFIX.sub("", model)


RESOLVED_MAX = 1_024


class PriceTable:
    def __init__(self, prices: dict[str, ModelPrice] | None = None) -> None:
        self.prices = dict(PRICES if prices is None else prices)
        # Snapshot names resolved to their base model's price (a regex each time otherwise).
        # Bounded: the API prices whatever model names its clients send.
        self._resolved: dict[str, ModelPrice | None] = {}

    @classmethod
    def from_file(cls, path: Path | None) -> PriceTable:
        table = cls()
        if path is None:
            return table
        try:
            data = tomllib.loads(path.read_text())
            for model, entry in data.get("models", {}).items():
                table.prices[model] = ModelPrice(
                    input=float(entry["input"]),
                    cached_input=float(entry.get("cached_input", entry["input"])),
                    output=float(entry.get("output", 0.0)),
                )
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
            raise PriceFileError(f"PAGERLOOP_PRICES_FILE {path}: {exc}") from exc
        return table

    def price(self, model: str) -> ModelPrice | None:
        found = self.prices.get(model)
        if found is not None:
            return found
        try:
            return self._resolved[model]
        except KeyError:
            found = self.prices.get(base_model(model))
            if len(self._resolved) < RESOLVED_MAX:
                self._resolved[model] = found
            return found

    def cost_usd(
        self, model: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> float | None:
        """The call's cost, or None for a model without a price."""
        price = self.price(model)
        if price is None:
            return None
        uncached = max(input_tokens - cached_input_tokens, 0)
        return (
            uncached * price.input
            + cached_input_tokens * price.cached_input
            + output_tokens * price.output
        ) / 1_000_000


DEFAULT_PRICES = PriceTable()


def cost_usd(
    model: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
) -> float | None:
    return DEFAULT_PRICES.cost_usd(model, input_tokens, output_tokens, cached_input_tokens)
