"""MiniCPM-V 4.5 (model_type "minicpmv", version 4.5): the 4.0 vision side with a 3D resampler
(frames of one packing group share 64 queries, keys carry a temporal embedding of their 0.1 s
timestamp id) and a Qwen3 text tower. Hybrid thinking lives in the chat template, not here."""
from __future__ import annotations

from .minicpmv_v4x import MiniCPMVV4x
from .qwen3 import Qwen3ForCausalLM


class MiniCPMV45(MiniCPMVV4x):
    family = "minicpmv4_5"
    text_cls = Qwen3ForCausalLM
    temporal = True
