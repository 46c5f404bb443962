"""Qwen3 text tower (the language model of MiniCPM-V 4.5, `llm.*` = transformers' Qwen3ForCausalLM):
the Llama block with an RMSNorm over each head's q and k before RoPE, and no attention bias."""
from __future__ import annotations

import torch

from ..layers.norm import RMSNorm
from .llama import LlamaAttention, LlamaConfig, LlamaForCausalLM, LlamaModel


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg: LlamaConfig):
        super().__init__(cfg)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor):
        return self.q_norm(q), self.k_norm(k)


class Qwen3Model(LlamaModel):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model

