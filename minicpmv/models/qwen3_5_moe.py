"""Qwen3.5-MoE text tower (MiniCPM-V 4.7-35B-A3B): the Qwen3.5 hybrid stack (models/qwen3_5.py)
with every feed-forward replaced by a sparse mixture of experts (layers/moe.py)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from torch import nn

from ..layers.moe import SparseMoeBlock
from .qwen3_5 import DecoderLayer, Qwen35TextConfig, Qwen35TextModel


@dataclass
class Qwen35MoeTextConfig(Qwen35TextConfig):
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0

    @classmethod
    def from_dict(cls, d: dict, tie_word_embeddings: bool) -> "Qwen35MoeTextConfig":
        # transformers 5.23 reads none of norm_topk_prob (always renormalises), decoder_sparse_step
        # and mlp_only_layers (every layer is MoE): neither do we
        base = Qwen35TextConfig.from_dict({"intermediate_size": 0, **d}, tie_word_embeddings)
        return cls(**{f.name: getattr(base, f.name) for f in fields(Qwen35TextConfig)},
                   num_experts=d.get("num_experts", 256), num_experts_per_tok=d.get("num_experts_per_tok", 8),
                   moe_intermediate_size=d.get("moe_intermediate_size", 512),
                   shared_expert_intermediate_size=d.get("shared_expert_intermediate_size", 512))


class MoeDecoderLayer(DecoderLayer):
    def make_mlp(self, cfg: Qwen35MoeTextConfig) -> nn.Module:
        return SparseMoeBlock(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                              cfg.shared_expert_intermediate_size)


class Qwen35MoeTextModel(Qwen35TextModel):
    layer_class = MoeDecoderLayer
