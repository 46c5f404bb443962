"""response_format json_object / json_schema (and vLLM's structured_outputs regex / choice /
json / grammar), enforced while decoding.

Library: llguidance (Rust, one 3 MB wheel, no dependencies). Its JSON-schema compiler builds the
grammar lazily, so a schema compiles in about a millisecond, and a token mask over the 248k-token
Qwen vocabulary takes a few milliseconds on one CPU core. xgrammar was the other candidate; it
pulls in transformers (and triton) at runtime, which this engine does not depend on.

Each sequence gets its own matcher, wrapped as an engine logits processor: before each sampling
step it feeds the matcher the tokens sampled since the last call, then masks every token the
grammar forbids. Once the JSON value is complete only the stop tokens remain. With thinking on,
the mask starts after `</think>`, so the reasoning stays free text and the answer is the JSON.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import torch

from ..errors import InputError

_JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: no runs of blank space to wander into


class GrammarFactory:
    """One llguidance tokenizer per server (building it scans the vocabulary for seconds while
    holding the GIL), made on first use or, as the server does, ahead of time with `warm_up()`."""

    def __init__(self, tokenizer, stop_token_ids: list[int]):
        self._tokenizer = tokenizer
        self.stop_token_ids = list(stop_token_ids)
        self.think_close_id = tokenizer.token_to_id("</think>")
        self._ll_tokenizer = None
        self._lock = threading.Lock()

    def is_token(self, text: str) -> bool:
        """True when `text` is one token of the vocabulary (then a grammar names it as <text>)."""
        return self._tokenizer.token_to_id(text) is not None

    def warm_up(self) -> None:
        self.ll_tokenizer()

    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                self._ll_tokenizer = llguidance.LLTokenizer(self._tokenizer.to_str(), eos_token=self.stop_token_ids)
            return self._ll_tokenizer

    def processor(self, kind: str, spec, starts_in_reasoning: bool) -> "GrammarConstraint":
        """kind "json" (spec: a JSON schema), "regex" (a pattern the whole answer matches) or "lark"."""
        from llguidance import LLMatcher

        try:
            if kind == "json":
                grammar = LLMatcher.grammar_from_json_schema(json.dumps(spec), defaults=_JSON_OPTIONS)
            elif kind == "regex":
                grammar = LLMatcher.grammar_from_regex(spec)
            else:
                grammar = LLMatcher.grammar_from_lark(spec)
        except (ValueError, TypeError, RuntimeError) as e:
            raise InputError(f"cannot compile the {kind} constraint: {e}") from e
        tokenizer = self.ll_tokenizer()
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InputError(f"cannot compile the {kind} constraint: {matcher.get_error()}")
        wait_for = self.think_close_id if starts_in_reasoning else None
        return GrammarConstraint(matcher, tokenizer.vocab_size, self.stop_token_ids, wait_for)


class GrammarConstraint:
    """Engine logits processor: (output_ids, logits [V]) -> logits with forbidden tokens at -inf."""

    def __init__(self, matcher, vocab_size: int, stop_token_ids: list[int], wait_for: int | None):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.stop_token_ids = torch.tensor(stop_token_ids, dtype=torch.long)
        self.wait_for = wait_for
        self.consumed = 0

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in output_ids[self.consumed:]:
            if self.wait_for is None:
                self.matcher.consume_token(token)
            elif token == self.wait_for:
                self.wait_for = None  # reasoning is over: the answer must match from here on
        self.consumed = len(output_ids)
        if self.wait_for is not None:
            return logits
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(self.vocab_size, logits.shape[-1])
        allowed[:n] = torch.from_numpy(bits[:n].astype(bool))
        if self.matcher.is_error() or not allowed.any():
            allowed[:] = False  # the grammar cannot go on: end the answer rather than emit garbage
            allowed[self.stop_token_ids] = True
        elif allowed[self.stop_token_ids].any():
            allowed[self.stop_token_ids] = True  # the value is complete: any stop token may end it
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))
