"""A decode step's Qwen3.5 layers in one extension call each (cpu/csrc/decode_layers.cpp).

A decode token costs each layer a few matrix products and ~60 small tensor ops and Python calls
around them (norms, splits, casts, gates, the DeltaNet conv and recurrence, the state bookkeeping,
residual adds), ~0.7 ms a layer on the AMX Xeon: a third of an int4 step of the real-size 4.6. Where
the CPU plan built the extension (the AVX-512 one, or the AVX2 module: cpu/native.py), a decode
batch (one token per sequence, few rows, no prompt chunk mixed in) runs a DeltaNet layer + its MLP,
or an attention layer + its MLP, as one call, with the kernels the modules would call one by one:
the same products on the same stored bytes (bf16 / int8 / int4 rows of the module, or fbgemm's
fp16-packed GEMV), the same conv, delta-rule and norm loops, states and keys/values advanced in
place in the pool. An attention layer whose own part does not qualify (a 16-bit KV pool) still runs
its MLP as one call. Projections a checkpoint keeps apart (a GPTQ checkpoint's) are multiplied side
by side as the one matrix the layer reads. Anything else (prompts, fp32 or GPU models, a matrix the
extension does not multiply) keeps the modules' own forward. `layer_step` returns None when the
layer does not qualify."""
from __future__ import annotations

import torch

from ..state.batch import ForwardBatch
from .fp16_packed import PackedFP16Linear
from .gated_delta import QK_NORM_EPS
from .mlp import GatedMLP
from .weight_formats import Bf16Linear, Int4Linear, Int8Linear

BF16, INT8, INT4, BF16_DOT, BF16_TILES = 0, 1, 2, 4, 5  # decode_layers.cpp's Lin kinds


def native_matrix(m, rows: int, kernels=None):
    """The extension's handle on module m's matrix for `rows` activation rows (how m's own
    forward would multiply them), or None where m would not use the extension for them. An
    fp16-packed matrix (layers/fp16_packed.py) runs fbgemm's GEMV inside the call, through
    `kernels` (the layer's module): fbgemm's packed rows need no extension of their own."""
    t = type(m)
    if t is PackedFP16Linear:
        return None if kernels is None else _fp16_matrix(m, kernels)
    if not (t is Bf16Linear or t is Int8Linear or _int4(t)) or m.bias is not None or not m.on_extension(rows):
        return None
    if t is Bf16Linear:
        kind = BF16_TILES if m.tiles else BF16_DOT if m.bf16_dot else BF16
        key, args = (m.weight.data_ptr(), m.weight._version, m.amx_rows, kind), (kind, m.weight, None, 0, m.amx_rows, None)
    else:
        q = m.qweight
        key = (q.data_ptr(), q._version)
        if t is Int8Linear:
            args = (INT8, q, m.scale, 0, 0, None)
        else:
            args = (INT4, q, m.scale_zero, m.group, 0, getattr(m, "perm", None))
    cached = m.__dict__.get("_native_matrix")
    if cached is None or cached[0] != key:
        kind, a, b, group, amx, perm = args
        cached = (key, m.native.Lin(kind, a, b, group, m.out_features, amx, perm))
        m.__dict__["_native_matrix"] = cached
    return cached[1]


def _fp16_matrix(m, kernels):
    """fbgemm's packed blocks (their bias inside) as one handle of `kernels`, cached on m."""
    key = (tuple(id(b) for b in m.blocks), id(kernels))
    cached = m.__dict__.get("_native_matrix")
    if cached is None or cached[0] != key:
        parts = [kernels.Lin(b, n) for b, n in zip(m.blocks, m.block_rows)]
        cached = (key, parts[0] if len(parts) == 1 else kernels.Lin(parts))
        m.__dict__["_native_matrix"] = cached
    return cached[1]


def native_projection(owner, fused: str, rows: int, kernels=None):
    """The extension's handle on `owner`'s fused projection (`fused`: a name of its packed_fusions,
    e.g. an MLP's gate_up_proj) for `rows` rows: the fused matrix where the load fused its members,
    else the members side by side (a GPTQ checkpoint keeps them apart), or None."""
    m = getattr(owner, fused)
    if m is not None:
        return native_matrix(m, rows, kernels)
    members = [getattr(owner, name) for name in owner.packed_fusions[fused]]
    handles = [None if x is None else native_matrix(x, rows, kernels) for x in members]
    if any(h is None for h in handles):
        return None
    key = tuple(x.__dict__["_native_matrix"][0] for x in members)
    cached = owner.__dict__.get("_native_" + fused)
    if cached is None or cached[0] != key:
        cached = (key, handles[0].__class__(handles))
        owner.__dict__["_native_" + fused] = cached
    return cached[1]


def _int4(t) -> bool:
    from ..quant.gptq_int4 import GPTQInt4Linear  # quant/ builds on layers/: imported when first needed

    return t is Int4Linear or t is GPTQInt4Linear


class LayerCall:
    """One layer's decode call for a row count: the extension function and every argument that does
    not change from step to step (matrix handles, norm scales, the DeltaNet decay terms, shapes),
    read from the modules once instead of ~40 attribute lookups a layer every step. It stays valid
    while no parameter, buffer or submodule anywhere was assigned since (torch's registration hooks
    bump EPOCH; so does cpu/apply.py as it applies a plan) and every parameter and buffer of the
    layer keeps its memory and version (in-place writes: loading, tests copying weights in); the
    terms derived from them (norm scales, decay rates) are read again whenever one changes. A plain
    attribute set on a live model by hand (e.g. a module's `native`) needs `invalidate()`."""

    __slots__ = ("kind", "static", "epoch", "tensors", "marks")

    def __init__(self, kind: str | None, static: tuple, tensors: list[torch.Tensor]):
        self.kind, self.static, self.epoch, self.tensors = kind, static, EPOCH[0], tensors
        self.marks = [(t.data_ptr(), t._version) for t in tensors]

    def current(self) -> bool:
        return self.epoch == EPOCH[0] and [(t.data_ptr(), t._version) for t in self.tensors] == self.marks


EPOCH = [0]


def invalidate(*_) -> None:
    """Every LayerCall is rebuilt at its next step."""
    EPOCH[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(invalidate)
torch.nn.modules.module.register_module_buffer_registration_hook(invalidate)
torch.nn.modules.module.register_module_module_registration_hook(invalidate)


def layer_step(layer, x: torch.Tensor, batch, layer_idx: int, rope):
    """A Qwen3.5 decoder layer (models/qwen3_5.py) for a decode batch x [B, 1, D] fp32 through
    the extension, or None where it does not qualify."""
    if x.shape[1] != 1 or x.dtype != torch.float32 or type(batch) is not ForwardBatch or batch.keep is not None:
        return None
    rows = x.shape[0]
    calls = layer.__dict__.setdefault("_decode_calls", {})
    call = calls.get(rows)
    if call is None or not call.current():
        call = calls[rows] = _layer_call(layer, rows)
    if call.kind == "delta":
        return _delta_step(call.static, x, batch, layer_idx)
    if call.kind == "attn":
        y = _attn_layer(call.static, x, batch, layer_idx, rope)
        if y is not None:
            return y
    if call.kind in ("attn", "attn_modules"):  # its attention as modules, its MLP as one call
        mlp_block, post, eps, gate_up, down = call.static[-1]
        h = layer.self_attn(layer.input_layernorm(x), batch, layer_idx, rope)
        return mlp_block((x + h)[:, 0].contiguous(), post, eps, gate_up, down)[:, None]
    return None


def _layer_call(layer, rows: int) -> LayerCall:
    tensors = list(layer.parameters()) + [b for b in layer.buffers() if b is not None]
    mlp = layer.mlp
    if type(mlp) is not GatedMLP or mlp.native is None:
        return LayerCall(None, (), tensors)
    ops = mlp.native
    gate_up, down = native_projection(mlp, "gate_up_proj", rows, ops), native_matrix(mlp.down_proj, rows, ops)
    post = _norm_scale(layer.post_attention_layernorm)
    if gate_up is None or down is None or post is None:
        return LayerCall(None, (), tensors)
    if layer.layer_type == "full_attention":
        block = (mlp.native.mlp_block, post, layer.post_attention_layernorm.eps, gate_up, down)
        static = _attn_static(layer, rows, post, gate_up, down)
        if static is None:
            return LayerCall("attn_modules", (block,), tensors)
        return LayerCall("attn", (*static, block), tensors)
    static = _delta_static(layer, rows, post, gate_up, down)
    return LayerCall(None if static is None else "delta", static or (), tensors)


def _attn_static(layer, rows, post, gate_up, down):
    attn = layer.self_attn
    pre, qs, ks = _norm_scale(layer.input_layernorm), _norm_scale(attn.q_norm), _norm_scale(attn.k_norm)
    if pre is None or qs is None or ks is None or attn.q_norm.eps != attn.k_norm.eps:
        return None
    ops = layer.mlp.native
    qkv, o_proj = native_projection(attn, "qkv_proj", rows, ops), native_matrix(attn.o_proj, rows, ops)
    if qkv is None or o_proj is None:
        return None
    return (layer.mlp.native.attn_layer, pre, post, layer.input_layernorm.eps, qkv, o_proj, gate_up, down, qs, ks,
            attn.q_norm.eps, attn.num_heads, attn.head_dim ** -0.5)


def _attn_layer(static, x, batch, layer_idx, rope):
    fn, pre, post, eps, qkv, o_proj, gate_up, down, qs, ks, qk_eps, heads, scale, _ = static  # _: the MLP block
    keys, values = batch.pool.keys[layer_idx], batch.pool.values[layer_idx]
    cos, sin = rope
    if (keys.dtype != torch.float32 or values.dtype != torch.float32 or not keys.is_contiguous()
            or not values.is_contiguous() or cos.dtype != torch.float32):
        return None
    return fn(x[:, 0].contiguous(), pre, post, eps, qkv, o_proj, gate_up, down, qs, ks, qk_eps,
              cos[:, 0].contiguous(), sin[:, 0].contiguous(), keys, values, batch.write_rows, batch.read_rows,
              [c + 1 for c in batch.context_lens], heads, scale)[:, None]


def _delta_static(layer, rows, post, gate_up, down):
    mixer = layer.linear_attn
    pre = _norm_scale(layer.input_layernorm)
    if mixer.native is None or pre is None or mixer.v_dim % 16:
        return None  # (the extension's delta rule walks value rows 16 floats at a time)
    in_proj, out_proj = native_projection(mixer, "in_proj", rows, mixer.native), native_matrix(mixer.out_proj, rows,
                                                                                                mixer.native)
    conv_w = mixer.conv1d.weight
    if (in_proj is None or out_proj is None or conv_w.dtype != torch.float32
            or mixer.norm.weight.dtype != torch.float32):
        return None
    conv_w = conv_w.reshape(mixer.conv_dim, -1).contiguous()
    neg_a, dt_bias = mixer.neg_A(mixer.A_log), mixer.dt_bias.float().contiguous()
    return (mixer.native.delta_layer, pre, post, layer.input_layernorm.eps, in_proj, out_proj, gate_up, down, conv_w,
            neg_a, dt_bias, mixer.norm.weight, mixer.norm.eps, mixer.num_k_heads, mixer.k_dim ** -0.5)


def _delta_step(static, x, batch, layer_idx):
    fn, pre, post, eps, in_proj, out_proj, gate_up, down, conv_w, neg_a, dt_bias, norm_w, norm_eps, heads, scale = static
    conv, rec = batch.pool.conv[layer_idx], batch.pool.recurrent[layer_idx]
    if conv.dtype != torch.float32 or rec.dtype != torch.float32 or not conv.is_contiguous() or not rec.is_contiguous():
        return None
    return fn(x[:, 0].contiguous(), pre, post, eps, in_proj, out_proj, gate_up, down, conv, conv_w, rec, batch.slots,
              neg_a, dt_bias, norm_w, norm_eps, heads, scale, QK_NORM_EPS)[:, None]


def _norm_scale(norm):
    """A Qwen3.5 zero-centred norm's fp32 scale (1 + w), where it runs on the extension."""
    if norm.native is None:
        return None
    return norm.scale(norm.weight)
