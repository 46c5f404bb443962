"""Everything between chat messages and prompt text, and between generated ids and the reply."""

from minicpmv.prompt.chat_template import CHATML_TEMPLATE, ChatTemplate, special_tokens_from_config
from minicpmv.prompt.detokenizer import IncrementalDetokenizer
from minicpmv.prompt.messages import IMAGE_MARKER, VIDEO_MARKER, NormalizedMessages, normalize_messages
from minicpmv.prompt.reasoning import ReasoningStreamParser, prompt_opens_reasoning, split_reasoning
from minicpmv.prompt.tool_calls import ToolCallStreamParser, parse_tool_calls

__all__ = [
    "CHATML_TEMPLATE",
    "ChatTemplate",
    "IMAGE_MARKER",
    "IncrementalDetokenizer",
    "NormalizedMessages",
    "ReasoningStreamParser",
    "ToolCallStreamParser",
    "VIDEO_MARKER",
    "normalize_messages",
    "parse_tool_calls",
    "prompt_opens_reasoning",
    "special_tokens_from_config",
    "split_reasoning",
]
