"""Llama text tower as MiniCPM-V 4.0 ships it (`llm.*` = transformers' LlamaForCausalLM): pre-norm
RMSNorm blocks, GQA, SwiGLU, rotate-half RoPE with the LongRoPE inverse frequencies its config names.

MiniCPM4's muP multipliers (scale_emb, dim_model_base, scale_depth) are absent from the 4.0 config and
the reference never applies them, so they are refused rather than silently ignored. Qwen3 (4.5) is the
same tower plus per-head q/k norms: see qwen3.py, which swaps in its attention class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..state import AttentionSpec, ForwardBatch
from ..layers.attention import cached_attention
from ..layers.mlp import GatedMLP
from ..layers.norm import RMSNorm
from ..layers.rotary import apply_rope


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """A flat (Llama/Qwen3-style) config.json; the MiniCPM-V keys beside the LLM ones are ignored."""
        for key in ("scale_emb", "dim_model_base", "scale_depth"):
            if d.get(key) is not None:
                raise ValueError(f"config has {key!r}: MiniCPM muP scaling is not part of the 4.0/4.5 architecture")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d.get('hidden_act')!r} is not supported (silu only)")
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        # transformers 5 writes `rope_parameters` (theta inside); older configs `rope_theta` + `rope_scaling`
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "longrope"):
            raise ValueError(f"rope type {rope_type!r} is not supported (default, longrope)")
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=rope if rope_type == "longrope" else None,
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)))


class RotaryEmbedding:
    """cos/sin tables for absolute positions. Plain attributes, not buffers: the model is built on the
    meta device and these come from the config, not the checkpoint.

    LongRoPE divides each frequency by its factor; the long set is used for a forward whose largest
    position is past original_max_position_embeddings, the short set otherwise (as transformers does).
    cos/sin are scaled by the attention factor (1.0 whenever factor <= 1, as for MiniCPM-V 4.0)."""

    def __init__(self, cfg: LlamaConfig):
        dim = cfg.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        powers = cfg.rope_theta ** exponents
        self.attention_factor = 1.0
        self.original_max = None
        if cfg.rope_scaling is None:
            self.short = 1.0 / powers
            self.long = self.short
        else:
            rs = cfg.rope_scaling
            short = torch.tensor(rs["short_factor"], dtype=torch.float32, device="cpu")
            long = torch.tensor(rs["long_factor"], dtype=torch.float32, device="cpu")
            if len(short) != dim // 2 or len(long) != dim // 2:
                raise ValueError(f"longrope factors need {dim // 2} entries (head_dim / 2), got {len(short)}/{len(long)}")
            self.original_max = int(rs.get("original_max_position_embeddings") or cfg.max_position_embeddings)
            factor = rs.get("factor")
            if factor is None:
                factor = cfg.max_position_embeddings / self.original_max
            attention_factor = rs.get("attention_factor")
            if attention_factor is None:
                attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.original_max))
            self.attention_factor = float(attention_factor)
            self.short = 1.0 / (short * powers)
            self.long = 1.0 / (long * powers)
            if torch.equal(short, long):  # MiniCPM-V 4.0 ships identical sets: no switch (and no sync) needed
                self.original_max = None

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [B, T] -> cos, sin [B, T, head_dim] in `dtype` (computed in fp32)."""
        inv_freq = self.short
        if self.original_max is not None and int(positions.max()) + 1 > self.original_max:
            inv_freq = self.long
        freqs = positions[..., None].float() * inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


class LlamaAttention(nn.Module):
    packed_fusions = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}  # see layers/fp16_packed.py
    prompt_flash = None  # the extension where the CPU plan runs a prompt's attention on it in bf16 (cpu/apply.py)

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, H, Hkv, hd = cfg.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.attention_bias)
        self.qkv_proj = None

    def state_spec(self) -> AttentionSpec:
        return AttentionSpec(self.num_kv_heads, self.head_dim)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor):
        """Hook for per-head q/k normalisation ([B, T, heads, head_dim]); Llama has none."""
        return q, k

    def forward(self, x: torch.Tensor, batch: ForwardBatch, layer_idx: int, rope) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            kv = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([self.num_heads * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, self.num_heads, self.head_dim)
        k = k.reshape(B, T, self.num_kv_heads, self.head_dim)
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.normalize_qk(q, k)
        cos, sin = rope
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        o = cached_attention(q, k, v, batch, layer_idx, self.head_dim ** -0.5, self.prompt_flash)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, attention_cls: type[LlamaAttention]):
        super().__init__()
        self.self_attn = attention_cls(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, batch: ForwardBatch, layer_idx: int, rope):
        x = x + self.self_attn(self.input_layernorm(x), batch, layer_idx, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.attention_cls) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)

    def state_spec(self) -> list:
        return [layer.self_attn.state_spec() for layer in self.layers]

    def forward(self, inputs_embeds: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """inputs_embeds [B, T, D] -> final hidden states [B, T, D] (after the last norm)."""
        rope = self.rotary(batch.positions, inputs_embeds.dtype)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, i, rope)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """`model.*` + `lm_head`, the key layout transformers writes (MiniCPM-V nests it under `llm.`)."""

    model_cls: type[LlamaModel] = LlamaModel

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = self.model_cls(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
