"""Generated ids -> what the caller sees (text, reasoning, tool calls, stop strings, finish reason)."""
from .decoder import OutputDecoder

__all__ = ["OutputDecoder"]
