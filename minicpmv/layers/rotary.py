"""Rotary position embedding in the rotate-half convention, with an optional partial rotary
dimension (Qwen3.5 rotates only the first quarter of each head)."""
import torch


def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device="cpu") / rotary_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, T, rotary_dim] in `dtype` (computed in fp32)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, R] with R <= D: rotate the first R dims, pass the rest."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :r], x[..., r:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def mrope_stream_of_slot(num_slots: int, section: tuple[int, int, int]) -> torch.Tensor:
    """Which position stream (0 T, 1 H, 2 W) drives each frequency slot under interleaved M-RoPE:
    slot i is H when i % 3 == 1 and i < 3*section[1], W when i % 3 == 2 and i < 3*section[2],
    T otherwise (Qwen3.5's [11, 11, 10] layout over 32 slots)."""
    stream = torch.zeros(num_slots, dtype=torch.long)
    for s in (1, 2):
        stream[s:min(3 * section[s], num_slots):3] = s
    return stream


def mrope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, section, dtype: torch.dtype):
    """positions [B, T] (all streams equal: plain RoPE) or [3, B, T] (T, H, W streams) ->
    cos, sin [B, T, rotary_dim] in `dtype` (computed in fp32)."""
    if positions.dim() == 2:
        return rope_cos_sin(positions, inv_freq, dtype)
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # [3, B, T, R/2]
    stream = mrope_stream_of_slot(freqs.shape[-1], tuple(section)).to(positions.device)
    freqs = freqs.gather(0, stream.expand(1, *freqs.shape[1:-1], -1))[0]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
