"""What a request costs: the provider's usage times the model's prices (model_info.py).

    cost = (prompt - cached - cache_write) x input
         + cached x cached_input            (the input price when the model has no cached price)
         + cache_write x cache_write_price  (the input price when the model has none)
         + completion x output              all prices in USD per million tokens

`prompt_tokens` includes the cached and the written tokens (proxy/core/usage.py). The worst case,
for a budget reservation before the call, is prompt x input + max_tokens x output, where a request
without max_tokens is reserved at the model's max_output_tokens (DEFAULT_MAX_OUTPUT when unknown).

A model without prices costs $0 (a self-hosted one, typically): logged once per model, so a
missing figure for a paid model is seen rather than silently free.
"""

from __future__ import annotations

import logging

from proxy.accounting.model_info import ModelInfo, ModelTable
from proxy.config import Config
from proxy.core.usage import Usage

log = logging.getLogger("proxy.accounting.prices")

DEFAULT_MAX_OUTPUT = 4096  # a model without max_output_tokens, for the worst case
_MAX_WARNED = 1024  # models named in the "no price" warning, at most (bounded set)


class Prices:
    def __init__(self, table: ModelTable):
        self.table = table
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, config: Config) -> "Prices":
        return cls(ModelTable.from_config(config))

    def info(self, model: str) -> ModelInfo:
        info = self.table.lookup(model)
        if not info.priced and model not in self._warned and len(self._warned) < _MAX_WARNED:
            self._warned.add(model)
            log.warning("no price for model %r: its cost counts as $0 (set [model_info.\"%s\"])",
                        model[:200], model[:200])
        return info

    def cost_usd(self, model: str, usage: Usage) -> float:
        info = self.info(model)
        inp = info.input_usd_per_mtok or 0.0
        cached_price = inp if info.cached_input_usd_per_mtok is None else info.cached_input_usd_per_mtok
        write_price = inp if info.cache_write_usd_per_mtok is None else info.cache_write_usd_per_mtok
        cached, written = usage.cached_tokens, usage.cache_write_tokens
        fresh = max(0, usage.prompt_tokens - cached - written)
        return (fresh * inp + cached * cached_price + written * write_price
                + usage.completion_tokens * (info.output_usd_per_mtok or 0.0)) / 1e6

    def worst_case_usd(self, model: str, prompt_tokens: int, max_tokens: int | None) -> float:
        info = self.info(model)
        if max_tokens is None:
            max_tokens = info.max_output_tokens or DEFAULT_MAX_OUTPUT
        return (prompt_tokens * (info.input_usd_per_mtok or 0.0)
                + max_tokens * (info.output_usd_per_mtok or 0.0)) / 1e6
