"""Causal softmax attention over the paged KV pool: one SDPA call per layer per model call,
over every sequence of the batch (keys gathered from their blocks, padding masked); one per part
of a mixed call. A 16-bit load's prompt (one sequence) runs the extension's bf16 kernel instead
where the CPU plan hands it over (`prompt_flash`: AVX512-BF16 without AMX)."""
import torch
import torch.nn.functional as F

from ..state.batch import ForwardBatch
from .scratch import scratch


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch, layer_idx: int,
                     scale: float, kernels=None) -> torch.Tensor:
    """q [B, H, T, D]; k, v [B, Hkv, T, D] (already rotated). Writes k/v into each sequence's
    blocks for this layer and attends causally over everything cached. Returns [B, H, T, D].
    `kernels`: the extension, for a prompt chunk of one sequence (a 16-bit load's CPU plan)."""
    if not isinstance(batch, ForwardBatch):  # a MixedBatch: [1, H, N, D] packed, per part
        heads_last = [t.transpose(1, 2) for t in (q, k, v)]  # [1, N, H, D]
        return batch.per_part(lambda part, q, k, v: cached_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), part, layer_idx, scale, kernels).transpose(1, 2),
            *heads_last).transpose(1, 2)
    B, Hkv, T, D = k.shape
    keys, values = batch.pool.keys[layer_idx], batch.pool.values[layer_idx]
    rows = batch.write_rows
    keys.index_copy_(0, rows, k.transpose(1, 2).reshape(B * T, Hkv, D).to(keys.dtype))
    values.index_copy_(0, rows, v.transpose(1, 2).reshape(B * T, Hkv, D).to(values.dtype))
    if kernels is not None and B == 1 and T > 1 and D % 2 == 0 and D <= 256 and q.device.type == "cpu":
        # a 16-bit load (the plan never hands it to dtype="float32"): q, k, v rounded to bf16 as the
        # matrix products round their inputs, fp32 softmax and sums
        return prompt_attention(kernels, q, k, v, batch, keys, values, scale).to(q.dtype)
    if batch.causal:  # a fresh prompt: its own keys, plain causal attention (no mask tensor at all)
        kk, vv = k, v
    elif B == 1 and T > 1 and _flash is not None and q.device.type == "cpu":
        c = batch.context_lens[0]
        read = batch.read_rows[0, :c]
        return chunk_after_context(q, k, v, _gather(keys, read, "k")[None].transpose(1, 2).to(q.dtype),
                                   _gather(values, read, "v")[None].transpose(1, 2).to(q.dtype), scale)
    else:
        read = batch.read_rows
        kk, vv = _gather(keys, read, "k").permute(0, 2, 1, 3), _gather(values, read, "v").permute(0, 2, 1, 3)
    return F.scaled_dot_product_attention(q, kk.to(q.dtype), vv.to(q.dtype), attn_mask=batch.attn_mask,
                                          is_causal=batch.causal, scale=scale, enable_gqa=True)


def prompt_attention(kernels, q, k, v, batch: ForwardBatch, keys, values, scale: float) -> torch.Tensor:
    """One sequence's prompt chunk after c cached tokens (c may be 0) on the extension's kernel, in bf16
    (fp32 softmax and sums): query t sees the cached keys and the chunk's keys up to t, in one pass
    over keys [c + T] (the chunk's are in the pool already). q [1, H, T, D] -> [1, H, T, D] bf16 (a
    view of [T, H, D])."""
    _, H, T, D = q.shape
    c = batch.context_lens[0]
    bf16 = torch.bfloat16
    if c:
        read = batch.read_rows[0, :c + T]
        kk, vv = _gather(keys, read, "k").to(bf16), _gather(values, read, "v").to(bf16)  # [c + T, Hkv, D]
    else:
        kk, vv = k[0].transpose(0, 1).to(bf16), v[0].transpose(0, 1).to(bf16)  # [T, Hkv, D]
    o = kernels.bf16_causal_attention(q[0].transpose(0, 1).to(bf16), kk, vv, c, scale)  # [T, H D]
    return o.view(1, T, H, D).transpose(1, 2)


def _gather(pool: torch.Tensor, rows: torch.Tensor, which: str) -> torch.Tensor:
    """pool[rows] for rows of any shape, written into a scratch buffer: a fresh 16 MB result per layer
    (16k cached tokens) costs more in page faults than the copy itself (in the engine ~5 ms per
    gather that way, ~2.6 ms reused). The result is valid until the next gather of the same `which`;
    the caller hands it straight to the attention kernel. Index_select, not advanced indexing (7x
    faster here)."""
    n = rows.numel() * pool[0].numel()
    out = scratch("gather-" + which, n, pool.dtype, pool.device).view(rows.numel(), *pool.shape[1:])
    torch.index_select(pool, 0, rows.reshape(-1), out=out)
    return out.view(*rows.shape, *pool.shape[1:])


_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def chunk_after_context(q, k, v, k_ctx, v_ctx, scale: float) -> torch.Tensor:
    """One sequence's prompt chunk after c cached tokens, without a [T, c + T] mask: q [1, H, T, D],
    the chunk's own k/v [1, Hkv, T, D], the cached k_ctx/v_ctx [1, Hkv, c, D]. Every query sees all
    cached keys (no mask: the query heads sharing a key head fold into one block of rows, one
    pass over each cached key head) and the chunk's keys causally; the two softmax halves are
    joined through their log-sum-exps. At c = 16k, T = 64 on 2 threads: 27 + ~2 ms against
    47 ms for one masked call (bf16), 54 against 84 (fp32)."""
    _, H, T, D = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    o_ctx, lse_ctx = _flash(q.reshape(1, Hkv, g * T, D), k_ctx, v_ctx, scale=scale)
    o_new, lse_new = _flash(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), is_causal=True,
                            scale=scale)
    lse_ctx = lse_ctx.reshape(1, H, T, 1)
    lse_new = lse_new.reshape(1, H, T, 1)
    w_ctx = torch.sigmoid(lse_ctx - lse_new)  # = e^lse_ctx / (e^lse_ctx + e^lse_new)
    out = o_ctx.reshape(1, H, T, D).float() * w_ctx + o_new.float() * (1 - w_ctx)
    return out.to(q.dtype)
