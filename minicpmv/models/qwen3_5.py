"""Qwen3.5 hybrid text tower (the language model of MiniCPM-V 4.6): gated DeltaNet layers
interleaved with gated softmax-attention layers, zero-centred RMSNorm, partial RoPE."""
from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..state import AttentionSpec, ForwardBatch, LinearSpec
from ..layers.attention import cached_attention
from ..layers import fused_decode
from ..layers.derived import Derived
from ..layers.gated_delta import QK_NORM_EPS, l2_normalize, prefill_gated_delta_rule, recurrent_gated_delta_step
from ..layers.mlp import GatedMLP
from ..layers.weight_formats import GEMV_ROWS, Bf16Linear
from ..layers.norm import GatedRMSNorm, ZeroCenteredRMSNorm
from ..layers.rotary import apply_rope, mrope_cos_sin, rope_inv_freq


@dataclass
class Qwen35TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: list
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    mrope_section: tuple = (11, 11, 10)  # frequency slots per T/H/W stream (interleaved M-RoPE)

    @classmethod
    def from_dict(cls, d: dict, tie_word_embeddings: bool) -> "Qwen35TextConfig":
        rope = d.get("rope_parameters") or {}
        n = d["num_hidden_layers"]
        layer_types = d.get("layer_types") or [
            "full_attention" if (i + 1) % d.get("full_attention_interval", 4) == 0 else "linear_attention"
            for i in range(n)
        ]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=n, num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d["num_key_value_heads"], head_dim=d.get("head_dim", 256),
            layer_types=list(layer_types), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25))),
            linear_conv_kernel_dim=d.get("linear_conv_kernel_dim", 4),
            linear_key_head_dim=d.get("linear_key_head_dim", 128),
            linear_value_head_dim=d.get("linear_value_head_dim", 128),
            linear_num_key_heads=d.get("linear_num_key_heads", 16),
            linear_num_value_heads=d.get("linear_num_value_heads", 32),
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            tie_word_embeddings=tie_word_embeddings,
            mrope_section=tuple(rope.get("mrope_section", d.get("mrope_section", (11, 11, 10)))),
        )


class GatedDeltaNet(nn.Module):
    # the four input projections read the same x (see layers/fp16_packed.py)
    packed_fusions = {"in_proj": ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")}
    # the decode token's conv and recurrence through cpu/native.py's extension, where the CPU plan
    # built it (cpu/apply.py sets `native` on modules that declare `native_ops`)
    native_ops, native = True, None
    # a context manager the CPU plan gives (cpu/denormals.py): prompt chunks run inside it
    denormal_flush = None

    def __init__(self, cfg: Qwen35TextConfig):
        super().__init__()
        self.num_k_heads, self.num_v_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.k_dim, self.v_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_size = self.num_k_heads * self.k_dim
        self.value_size = self.num_v_heads * self.v_dim
        self.conv_dim = 2 * self.key_size + self.value_size
        self.kernel = cfg.linear_conv_kernel_dim
        D = cfg.hidden_size
        self.in_proj_qkv = nn.Linear(D, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(D, self.value_size, bias=False)
        self.in_proj_b = nn.Linear(D, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(D, self.num_v_heads, bias=False)
        # stored as the checkpoint does: Conv1d weight [C, 1, K] (depthwise)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = GatedRMSNorm(self.v_dim, eps=cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_size, D, bias=False)
        self.in_proj = None
        self.neg_A = Derived(lambda a_log: -a_log.float().exp())

    def state_spec(self) -> LinearSpec:
        return LinearSpec(self.conv_dim, self.kernel, self.num_v_heads, self.k_dim, self.v_dim)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, layer_idx: int) -> torch.Tensor:
        B, T, _ = x.shape
        if self.in_proj is not None:
            # a prompt on a CPU plan's bf16 GEMM with the extension: the projection stays bf16 (its
            # widest part, qkv, only feeds the extension's conv, which reads bf16 rows)
            narrow = (self.native is not None and type(self.in_proj) is Bf16Linear and B * T > GEMV_ROWS
                      and self.conv_dim % 16 == 0)
            proj = self.in_proj.bf16_product(x) if narrow else self.in_proj(x)
            qkv, z, b, a = proj.split([self.conv_dim, self.value_size, self.num_v_heads, self.num_v_heads], dim=-1)
            z, b = z.to(x.dtype), b.to(x.dtype)
        else:
            qkv, z, b, a = self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        z = z.reshape(B, T, self.num_v_heads, self.v_dim)
        beta = b.sigmoid()
        g = self.neg_A(self.A_log) * F.softplus(a.float() + self.dt_bias)
        o = batch.per_part(lambda part, qkv, beta, g: self.mix(qkv, beta, g, part, layer_idx, x.dtype), qkv, beta, g)
        o = self.norm(o.to(x.dtype), z)
        return self.out_proj(o.reshape(B, T, self.value_size))

    def mix(self, qkv: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, batch: ForwardBatch,
            layer_idx: int, dtype: torch.dtype) -> torch.Tensor:
        """The sequence-wise part: qkv [B, T, C], beta and g [B, T, H] -> o [B, T, H, dv] (fp32), the
        conv windows and recurrent states of the batch's sequences advanced by T tokens."""
        B, T, _ = qkv.shape
        conv_state = batch.conv_state(layer_idx)  # [B, C, K-1]
        if (T == 1 and self.native is not None and qkv.dtype == conv_state.dtype == torch.float32
                and self.v_dim % 16 == 0):  # the extension's rows are 16 floats wide
            return self._native_decode(qkv, beta, g, conv_state, batch, layer_idx)
        new_conv = _window_columns(conv_state, qkv, T, T + self.kernel - 1)  # the last K-1 inputs
        # the window at a reuse boundary, taken before store_conv overwrites the cached inputs
        keep_conv = (None if batch.keep is None else
                     _window_columns(conv_state, qkv, batch.keep[0], batch.keep[0] + self.kernel - 1).clone())
        qkv = self._causal_conv(qkv, conv_state, dtype)
        batch.store_conv(layer_idx, new_conv)
        if T > 1 and self.native is not None and self.v_dim % 16 == 0:
            # a CPU plan's prompt: the extension's rule reads the conv rows and normalises q and k
            # itself, with the decode step's arithmetic (no split, norms or copies here)
            inputs = (qkv.float().contiguous(), g.float().contiguous(), beta.float().contiguous())
            rule = partial(_native_rule, self.native, self.num_k_heads, self.k_dim ** -0.5)
        else:
            q, k, v = torch.split(qkv, [self.key_size, self.key_size, self.value_size], dim=-1)
            q = q.reshape(B, T, self.num_k_heads, self.k_dim)
            k = k.reshape(B, T, self.num_k_heads, self.k_dim)
            v = v.reshape(B, T, self.num_v_heads, self.v_dim)
            if self.num_v_heads != self.num_k_heads:  # each key head serves consecutive value heads
                rep = self.num_v_heads // self.num_k_heads
                q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
            q = l2_normalize(q.float()) * self.k_dim ** -0.5
            k = l2_normalize(k.float())
            v = v.float()
            if T == 1:
                # decode: one batched step per run of consecutive slots, each state updated in place
                beta = beta.float()
                outs = [recurrent_gated_delta_step(q[r, 0], k[r, 0], v[r, 0], g[r, 0], beta[r, 0], state)
                        for r, state in batch.recurrent_views(layer_idx)]
                return (outs[0] if len(outs) == 1 else torch.cat(outs)).unsqueeze(1)  # [B, 1, H, dv]
            inputs, rule = (q, k, v, g, beta), _prefill_rule
        with self.denormal_flush() if self.denormal_flush is not None else nullcontext():
            return self._prefill(inputs, keep_conv, batch, layer_idx, rule)

    def _causal_conv(self, qkv: torch.Tensor, conv_state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The short causal conv (+ silu) of qkv [B, T, C], continuing from the cached inputs
        conv_state [B, C, K-1]; fp32 math on the [B, T, C] rows the projection wrote (no
        transposes; q/k/v come out contiguous for the norms). With the extension: one pass that
        reads bf16 or fp32 rows (a 512-token prompt of the real-size 4.6: ~9 ms a layer of tensor
        ops -> ~2). fp32 weights otherwise: K multiply-adds, tap by tap as the oracle's fp32 conv
        sums (bit for bit on the AMX Xeon), ~2.6 ms a layer against 6.7 for a bf16 conv call."""
        T, K = qkv.shape[1], self.kernel
        if self.native is not None and T > 1 and self.conv_dim % 16 == 0 and qkv.stride(-1) == 1:
            past = conv_state.transpose(1, 2).float().contiguous()  # [B, K-1, C]
            w = self.conv1d.weight[:, 0].float().t().contiguous()  # [K, C]
            return self.native.conv_prompt(qkv, past, w).to(dtype)
        if self.conv1d.weight.dtype != torch.float32:
            # 16-bit weights without a CPU plan (a bf16 model, a GPU): the reference's own ops, its
            # conv output and silu each rounded to the weights' dtype
            window = torch.cat([conv_state.to(qkv.dtype), qkv.transpose(1, 2)], dim=-1)
            w = self.conv1d.weight
            return F.silu(F.conv1d(window.to(w.dtype), w, groups=self.conv_dim)).to(dtype).transpose(1, 2)
        w = self.conv1d.weight[:, 0].t()  # [K, C]
        if T == 1:  # a decode token: one multiply-add over each channel's window, ~10x a conv call
            window = torch.cat([conv_state.float(), qkv.transpose(1, 2).float()], dim=-1)  # [B, C, K]
            return F.silu((window * w.t()).sum(-1, keepdim=True)).transpose(1, 2).to(dtype)
        window = torch.cat([conv_state.transpose(1, 2).float(), qkv.float()], dim=1)  # [B, K-1+T, C]
        out = window[:, :T] * w[0]
        for j in range(1, K):
            out.addcmul_(window[:, j:j + T], w[j])
        return F.silu(out, inplace=True).to(dtype)

    def _prefill(self, inputs: tuple, keep_conv, batch: ForwardBatch, layer_idx: int, rule) -> torch.Tensor:
        """A prompt chunk of each sequence through `rule` (inputs: its tensors, tokens along dim 1;
        rule(*inputs, state) -> (o, final state)), its state advanced in the pool (keep_conv: the conv
        window at the reuse boundary, when the batch keeps one)."""
        views = batch.recurrent_views(layer_idx)  # [(rows, state [n, H, dk, dv] fp32 in the pool)]
        if batch.keep is not None:
            # one sequence passing a reuse boundary at offset j: run the recurrence up to j, keep the
            # state there (conv window = the K-1 inputs before j), then go on from it
            j = batch.keep[0]
            [(_, state)] = views
            first, mid = rule(*(x[:, :j] for x in inputs), state)
            batch.keep_linear(layer_idx, keep_conv[0], mid[0])
            rest, final = rule(*(x[:, j:] for x in inputs), mid)
            if final is not state:
                state.copy_(final)
            return torch.cat([first, rest], dim=1)
        outs = []
        for r, state in views:
            o, final = rule(*(x[r] for x in inputs), state)
            if final is not state:  # (the extension's rule advances a contiguous state in place)
                state.copy_(final)
            outs.append(o)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _native_decode(self, qkv, beta, g, conv_state, batch, layer_idx):
        """The decode token through cpu/native.py's extension: conv + silu in one call, then the l2
        norms and the recurrence per run of slots in one call each (states updated in place)."""
        y, window = self.native.conv_step(conv_state.contiguous(), qkv.reshape(qkv.shape[0], -1).contiguous(),
                                          self.conv1d.weight.reshape(self.conv_dim, -1).contiguous())
        batch.store_conv(layer_idx, window)
        beta, g = beta[:, 0].float().contiguous(), g[:, 0].float().contiguous()
        outs = []
        for r, state in batch.recurrent_views(layer_idx):
            work = state if state.is_contiguous() else state.contiguous()  # the kernel walks whole states
            outs.append(self.native.delta_step(y[r].contiguous(), g[r].contiguous(), beta[r].contiguous(), work,
                                               self.num_k_heads, self.k_dim ** -0.5, QK_NORM_EPS))
            if work is not state:
                state.copy_(work)
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).unsqueeze(1)  # [B, 1, H, dv]


def _window_columns(conv_state: torch.Tensor, qkv: torch.Tensor, i0: int, i1: int) -> torch.Tensor:
    """Columns [i0, i1) of the conv's input window (the K-1 cached inputs conv_state [B, C, K-1],
    then the T new ones qkv [B, T, C]) as fp32 [B, C, i1 - i0]: the next cached window, or the
    window at a reuse boundary."""
    past = conv_state.shape[-1]
    parts = []
    if i0 < past:
        parts.append(conv_state[..., i0:min(i1, past)].float())
    if i1 > past:
        parts.append(qkv[:, max(i0 - past, 0):i1 - past].transpose(1, 2).float())
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _prefill_rule(q, k, v, g, beta, state):
    """The chunked rule on [B, T, H, .] inputs -> (o [B, T, H, dv], final state)."""
    o, final = prefill_gated_delta_rule(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        g.transpose(1, 2), beta.float().transpose(1, 2), state)
    return o.transpose(1, 2), final


def _native_rule(native, key_heads: int, scale: float, y, g, beta, state):
    """The rule token by token in cpu/native.py's extension on the conv rows y [B, T, C] (g, beta
    [B, T, H]): the decode step's arithmetic, q and k normalised inside (a CPU plan's prompts; the
    chunked form above stays the fp32 and GPU path) -> (o [B, T, H, dv], final state). The state
    advances in place where it is contiguous (a run of pool slots): a fresh 1 MB copy per layer cost
    more in page faults than the copy (~1.7 ms a layer, 512-token prompt of the real-size 4.6;
    docs/performance.md)."""
    final = state if state.is_contiguous() else state.contiguous()
    o = native.delta_rule_prompt(y.contiguous(), g.contiguous(), beta.contiguous(), final, key_heads, scale,
                                 QK_NORM_EPS)
    return o, final


class GatedAttention(nn.Module):
    """Softmax attention whose output is gated per channel by sigmoid(gate); the gate comes from
    the second half of each head's q_proj rows."""

    packed_fusions = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}  # see layers/fp16_packed.py
    prompt_flash = None  # the extension where the CPU plan runs a prompt's attention on it in bf16 (cpu/apply.py)

    def __init__(self, cfg: Qwen35TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, H, Hkv, hd = cfg.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, 2 * H * hd, bias=False)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=False)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, D, bias=False)
        self.q_norm = ZeroCenteredRMSNorm(hd, eps=cfg.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(hd, eps=cfg.rms_norm_eps)
        self.qkv_proj = None

    def state_spec(self) -> AttentionSpec:
        return AttentionSpec(self.num_kv_heads, self.head_dim)

    def forward(self, x, batch: ForwardBatch, layer_idx: int, rope) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            kv = self.num_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split([2 * self.num_heads * self.head_dim, kv, kv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, gate = q.reshape(B, T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(k.reshape(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = cached_attention(q, k, v, batch, layer_idx, self.head_dim ** -0.5, self.prompt_flash)
        o = o.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate.reshape(B, T, -1))
        return self.o_proj(o)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen35TextConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg)
        elif layer_type == "full_attention":
            self.self_attn = GatedAttention(cfg)
        else:
            raise ValueError(f"unknown Qwen3.5 layer type {layer_type!r}")
        self.mlp = self.make_mlp(cfg)
        self.input_layernorm = ZeroCenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def make_mlp(self, cfg: Qwen35TextConfig) -> nn.Module:
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if self.layer_type == "linear_attention" else self.self_attn

    def forward(self, x, batch: ForwardBatch, layer_idx: int, rope):
        if x.shape[1] == 1 and getattr(self.mlp, "native", None) is not None:  # decode on the CPU extension
            y = fused_decode.layer_step(self, x, batch, layer_idx, rope)
            if y is not None:
                return y
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            h = self.linear_attn(h, batch, layer_idx)
        else:
            h = self.self_attn(h, batch, layer_idx, rope)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen35TextModel(nn.Module):
    layer_class = DecoderLayer  # the MoE tower swaps in its own (models/qwen3_5_moe.py)

    def __init__(self, cfg: Qwen35TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(cfg, t) for t in cfg.layer_types)
        self.norm = ZeroCenteredRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        rotary_dim = int(cfg.head_dim * cfg.partial_rotary_factor)
        # a plain attribute, not a buffer: the model is built on the meta device and this is
        # derived from the config, not loaded
        self.inv_freq = rope_inv_freq(rotary_dim, cfg.rope_theta).to("cpu")

    def state_spec(self) -> list:
        return [layer.mixer.state_spec() for layer in self.layers]

    def forward(self, inputs_embeds: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """inputs_embeds [B, T, D] -> final hidden states [B, T, D] (after the last norm).
        batch.positions: [B, T], or [3, B, T] (T, H, W) for MiniCPM-V 4.7's canvas M-RoPE."""
        rope = mrope_cos_sin(batch.positions, self.inv_freq, self.config.mrope_section, inputs_embeds.dtype)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, i, rope)
        return self.norm(x)
