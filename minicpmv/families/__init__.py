"""Per-family glue between chat messages and the engine: which preprocessing, which defaults,
which stop tokens. One small module per family; `adapter_for(config)` picks it."""
from __future__ import annotations

from ..models.registry import family_of


def adapter_for(folder, config: dict, tokenizer):
    family = family_of(config)
    if family == "minicpmv4_6":
        from .v46 import Family46

        return Family46(folder, config, tokenizer)
    if family == "minicpmv4_7":
        from .v47 import Family47

        return Family47(folder, config, tokenizer)
    if family in ("minicpmv4_0", "minicpmv4_5"):
        from .v4x import FamilyV4x

        return FamilyV4x(folder, config, tokenizer)
    raise NotImplementedError(f"chat for {family} is not wired in yet")
