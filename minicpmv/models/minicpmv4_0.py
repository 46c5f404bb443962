"""MiniCPM-V 4.0 (model_type "minicpmv", version 4.0): SigLIP-400M NaViT tower, 2D perceiver
resampler (64 queries per crop), Llama text tower with LongRoPE. Videos are plain frame lists, so
the resampler never sees temporal ids."""
from __future__ import annotations

from .llama import LlamaForCausalLM
from .minicpmv_v4x import MiniCPMVV4x


class MiniCPMV40(MiniCPMVV4x):
    family = "minicpmv4_0"
    text_cls = LlamaForCausalLM
    temporal = False
