"""The gated delta rule (Gated DeltaNet) in plain PyTorch.

State per value head: S in R^{dk x dv}. Per token t:
    S <- exp(g_t) * S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t
Prefill uses the chunked (WY) form: the intra-chunk part becomes small matmuls and a unit
lower-triangular solve, only the chunk-to-chunk state update is sequential. Decode (one token)
uses the recurrence directly. All math is float32 whatever the model dtype.
"""
import torch
import torch.nn.functional as F


# eps inside the root of q's and k's l2 norms: this module's, and the extension's rules (their
# prompt, decode step and fused decode layer) take the same
QK_NORM_EPS = 1e-6


def l2_normalize(x: torch.Tensor, eps: float = QK_NORM_EPS) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


EXP_FLOOR = -87.0  # exp(-87) = 1.6e-38, the last normal fp32 range; below it the result is 0 or denormal


def chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size: int = 64):
    """q, k [B, H, T, dk]; v [B, H, T, dv]; g, beta [B, H, T]; state [B, H, dk, dv] (fp32).
    q and k are already l2-normalised and q scaled. Returns (o [B, H, T, dv], new state).
    Internally chunk-major ([n, B*H, C, d]: the one copy the strided inputs need anyway), so every
    product is a 3-D bmm on contiguous operands and each step of the loop reads contiguous slices
    (no hidden copies for transposes or strided batches)."""
    B, H, T, dk = k.shape
    dv, C = v.shape[-1], chunk_size
    pad = (-T) % C
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n, BH = (T + pad) // C, B * H

    def chunk_major(x):  # [B, H, n*C, ...] -> [n, B*H, C, ...] contiguous
        x = x.reshape(BH, n, C, *x.shape[3:]).transpose(0, 1)
        return x.contiguous()

    q, k, v = chunk_major(q), chunk_major(k), chunk_major(v)
    g = chunk_major(g).cumsum(-1)  # [n, BH, C]: inclusive log-decay within each chunk
    beta = chunk_major(beta).unsqueeze(-1)
    k_beta, v_beta = k * beta, v * beta
    flat = (n * BH, C)  # the batch of all chunks of all heads, for the products within chunks

    # decay[i, j] = exp(G_i - G_j) for j <= i, else 0. Arguments below EXP_FLOOR give 0 rather than
    # a denormal (or 0 through exp(-inf)): x86's vectorised exp leaves its fast path for any lane
    # under ~-87 (measured 0.07 ms on [16, 8, 64, 64] in range, 6.8 ms at -200 and 2.2 ms at -inf)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = g.unsqueeze(-1) - g.unsqueeze(-2)
    decay = diff.clamp_min(EXP_FLOOR).exp_().masked_fill_(~causal | (diff < EXP_FLOOR), 0.0)
    k_t = k.view(*flat, dk).transpose(1, 2)
    # (I + L) with L the strictly lower part of (k_beta k^T) * decay; the solve uses the unit diagonal
    system = torch.bmm(k_beta.view(*flat, dk), k_t).view_as(decay).mul_(decay)
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta.mul_(g.exp().unsqueeze(-1)), upper=False, unitriangular=True)
    intra = torch.bmm(q.view(*flat, dk), k_t).view_as(decay).mul_(decay)
    q_decayed = q * g.exp().unsqueeze(-1)  # q and k may be the caller's tensors (no copy needed)
    k_to_end = k.mul((g[..., -1:] - g).exp().unsqueeze(-1)).transpose(-1, -2)  # [n, BH, dk, C]
    chunk_decay = g[..., -1].exp()[..., None, None]  # [n, BH, 1, 1]

    state = state.reshape(BH, dk, dv).clone()
    out = torch.empty(n, BH, C, dv, dtype=v.dtype, device=v.device)
    for i in range(n):
        v_new = torch.baddbmm(u[i], w[i], state, alpha=-1)  # u - w S
        torch.baddbmm(torch.bmm(q_decayed[i], state), intra[i], v_new, out=out[i])
        state = torch.baddbmm(state * chunk_decay[i], k_to_end[i], v_new)
    out = out.view(n, B, H, C, dv).permute(1, 2, 0, 3, 4).reshape(B, H, n * C, dv)
    return out[:, :, :T], state.view(B, H, dk, dv)


def prefill_gated_delta_rule(q, k, v, g, beta, state):
    """The rule over a prompt chunk of any length, in the form that is cheapest for that length
    (same arguments and result as chunk_gated_delta_rule; `state` is not modified). The chunked
    form's cost is set by its chunk size, not by T: a chunk of a few tokens (the tail of a turn,
    a chunk cut by the token budget) pays for 64. Measured on 16 heads of 128 x 128, 2 threads:
    T=4 recurrent 0.5 ms vs chunk-64 4.4 ms; T=16 chunk-16 1.1 ms vs 3.5; T=30 chunk-32 1.6 vs 3.4;
    from 64 tokens on, 64 is as good as any."""
    T = q.shape[2]
    if T <= 4:
        state = state.clone()
        out = torch.stack([recurrent_gated_delta_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t],
                                                      state) for t in range(T)], dim=2)
        return out, state
    return chunk_gated_delta_rule(q, k, v, g, beta, state, chunk_size=16 if T <= 16 else 32 if T <= 32 else 64)


def recurrent_gated_delta_step(q, k, v, g, beta, state):
    """One token, updating `state` in place. q, k [B, H, dk]; v [B, H, dv]; g, beta [B, H];
    state [B, H, dk, dv] (fp32). Returns o [B, H, dv]. The state is the largest thing a decode
    step touches besides the weights, so it is read and written once, never copied: the rank-1
    update k (x) delta is accumulated into it by one batched GEMM (baddbmm_) rather than built
    as a [dk, dv] temporary and added, and the two products are 3-D bmm calls (a 4-D matmul
    dispatches several reshapes around its bmm)."""
    B, H, dk = k.shape
    dv = v.shape[-1]
    if not state.is_contiguous():
        return _step_strided(q, k, v, g, beta, state)
    s = state.view(B * H, dk, dv)
    s.mul_(g.exp().view(B * H, 1, 1))
    k3 = k.reshape(B * H, 1, dk)
    delta = (v.reshape(B * H, 1, dv) - torch.bmm(k3, s)).mul_(beta.reshape(B * H, 1, 1))  # beta (v - S^T k)
    s.baddbmm_(k3.transpose(1, 2), delta)
    return torch.bmm(q.reshape(B * H, 1, dk), s).view(B, H, dv)  # S^T q


def _step_strided(q, k, v, g, beta, state):
    """The same step on a state that is a strided view (cannot be flattened in place)."""
    state.mul_(g.exp()[..., None, None])
    kv_mem = (k.unsqueeze(-2) @ state).squeeze(-2)  # S^T k
    delta = (v - kv_mem) * beta.unsqueeze(-1)
    state.add_(k.unsqueeze(-1) * delta.unsqueeze(-2))
    return (q.unsqueeze(-2) @ state).squeeze(-2)  # S^T q
