"""Token ids -> text deltas while generating, never splitting a UTF-8 character.

Byte-level BPE pieces can end in the middle of a character; decoding then ends in U+FFFD. Text is emitted up to
(not including) a trailing U+FFFD run, which is held back until a later token completes the character (or until
flush, when it really was invalid). Only a small window of ids is decoded per token: after each clean step the
window is cut back to a few context tokens, which keep decoders that look at the first token (SentencePiece's
leading-space strip) giving the same text they give inside the full sequence.
"""

from __future__ import annotations

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 4  # kept at the window's front after each clean step
# A partial character spans at most 4 tokens; this many unresolved tokens means genuinely invalid bytes.
_MAX_WINDOW = 64


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # context tokens + tokens not yet cleanly emitted
        self._emitted = 0  # chars of decode(window) already returned (or belonging to the context)

    def add(self, token_id: int) -> str:
        self._window.append(token_id)
        text = self._decode(self._window)
        stable = len(text.rstrip(_REPLACEMENT))
        if stable < len(text) and len(self._window) < _MAX_WINDOW:
            # The last character may still be completed by the next token: emit only what precedes it.
            new, self._emitted = text[self._emitted : stable], max(self._emitted, stable)
            return new
        new = text[self._emitted :]
        self._window = self._window[-_CONTEXT_TOKENS:]
        self._emitted = len(self._decode(self._window))
        return new

    def flush(self) -> str:
        """The held-back tail (bytes that never formed a character) at the end of generation; resets the state."""
        new = self._decode(self._window)[self._emitted :]
        self._window, self._emitted = [], 0
        return new

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
