"""Prefix reuse: the state of a sequence at a boundary (end of its prompt, end of its reply) kept
under a key of everything that produced it, so a later request starting with the same tokens and
the same images skips that work.

A key hashes the token ids of the prefix plus the content keys of every vision input whose
placeholders appear in it (the placeholder ids are the same for every image; the pixels are not).
An entry holds references to the KV blocks of the prefix and, for models with a recurrent state,
a slot with a copy of that state taken at exactly that boundary. Entries are dropped least
recently used first when the pool needs their blocks or slots."""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(eq=False)
class PrefixEntry:
    key: bytes
    length: int
    blocks: list[int]
    slot: int | None


def vision_starts(tokens: list[int], vision: list) -> list[tuple[int, str]]:
    """(first placeholder index, content key) of each vision input, in prompt order."""
    out = []
    for v in vision:
        try:
            out.append((tokens.index(v.token_id), v.cache_key or ""))
        except ValueError:
            continue
    return sorted(out)


def prefix_keys(tokens: list[int], vision_marks: list[tuple[int, str]], lengths: list[int]) -> dict[int, bytes]:
    """The key of tokens[:L] for each L in `lengths`, from one pass over the tokens."""
    h = hashlib.blake2b(digest_size=16)
    out, done = {}, 0
    for L in sorted(set(lengths)):
        h.update(array("q", tokens[done:L]).tobytes())
        done = L
        tail = h.copy()
        for start, key in vision_marks:
            if start < L:
                tail.update(b"|" + key.encode())
        out[L] = tail.digest()
    return out


class PrefixCache:
    def __init__(self):
        self.entries: OrderedDict[bytes, PrefixEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self.entries)

    def lengths(self) -> list[int]:
        return sorted({e.length for e in self.entries.values()})

    def lookup(self, tokens: list[int], vision_marks, max_length: int) -> PrefixEntry | None:
        """The longest entry that is a prefix of `tokens` and no longer than max_length."""
        lengths = [L for L in self.lengths() if 0 < L <= max_length]
        if lengths:
            keys = prefix_keys(tokens, vision_marks, lengths)
            for L in sorted(keys, reverse=True):
                entry = self.entries.get(keys[L])
                if entry is not None and entry.length == L:
                    self.entries.move_to_end(entry.key)
                    self.hits += 1
                    self.hit_tokens += L
                    return entry
        self.misses += 1
        return None

    def add(self, entry: PrefixEntry) -> None:
        self.entries[entry.key] = entry

    def __contains__(self, key: bytes) -> bool:
        return key in self.entries

    def pop_oldest(self) -> PrefixEntry | None:
        if not self.entries:
            return None
        return self.entries.popitem(last=False)[1]
