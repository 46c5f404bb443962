"""OpenAI `logprobs` / `top_logprobs`: the log-probability of each generated token under the model's own
distribution (its raw logits, before grammar masks, penalties and temperature; vLLM's default), and the
`top_logprobs` most likely tokens at that position.

A `LogprobRecorder` is the first logits processor of a choice. The engine calls it for position t (t tokens
generated so far) just before sampling token t, on the engine thread; the decoder asks for position t after
token t arrives, on the event loop. The recorder keeps one full distribution (the latest position) and, once
the next call reveals which token was sampled there, only that token's figure and the top list.
"""
from __future__ import annotations

import threading

import torch

MAX_TOP_LOGPROBS = 20


class LogprobRecorder:
    def __init__(self, top: int):
        self.top = top
        self._lock = threading.Lock()
        self._last: tuple[int, torch.Tensor] | None = None  # (position, log-softmax over the vocabulary)
        self._done: dict[int, tuple[float, list[tuple[int, float]]]] = {}

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(logits.detach().float(), -1).cpu()
        with self._lock:
            if self._last is not None and self._last[0] < len(output_ids):
                position, previous = self._last
                self._done[position] = self._summary(previous, output_ids[position])
            self._last = (len(output_ids), logprobs)
        return logits

    def take(self, position: int, token: int) -> tuple[float, list[tuple[int, float]]] | None:
        """(logprob of `token` at `position`, [(token id, logprob)] of the top ones); None if never recorded."""
        with self._lock:
            if position in self._done:
                return self._done.pop(position)
            if self._last is not None and self._last[0] == position:
                return self._summary(self._last[1], token)
        return None

    def _summary(self, logprobs: torch.Tensor, token: int) -> tuple[float, list[tuple[int, float]]]:
        top = []
        if self.top:
            values, ids = torch.topk(logprobs, min(self.top, logprobs.shape[-1]))
            top = list(zip(ids.tolist(), values.tolist()))
        return float(logprobs[token]), top


def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet: printable bytes stand for themselves, the others are shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTES = _byte_decoder()


class TokenText:
    """A token id -> (its text, its exact UTF-8 bytes), as OpenAI's logprobs entries show them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.added = {i for i in tokenizer.get_added_tokens_decoder()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            piece = self.tokenizer.id_to_token(token) or ""
            if token in self.added or not all(c in _BYTES for c in piece):
                data = piece.encode()
            else:
                data = bytes(_BYTES[c] for c in piece)
            self._cache[token] = (data.decode("utf-8", errors="replace"), list(data))
        return self._cache[token]

    def entry(self, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        text, data = self(token)
        return {"token": text, "logprob": logprob, "bytes": data,
                "top_logprobs": [{"token": self(t)[0], "logprob": lp, "bytes": self(t)[1]} for t, lp in top]}
