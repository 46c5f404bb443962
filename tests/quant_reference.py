"""The few-row int8 / int4 kernels' arithmetic in float64 (cpu/csrc/quant_gemv.cpp on AVX-512,
cpu/csrc/avx2_gemv.cpp on AVX2: both round the activations the same way), for their tests."""
import torch

from minicpmv.layers.weight_formats import Int4Linear, Int8Linear


def int8_rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the VNNI rows (int8 and int4) round it, in float64: per row and block of 32 inputs,
    a = round-half-even(x * (127 / max|x|)) in fp32, d = max|x| / 127 in fp32; returns d a."""
    m, k = x.shape
    xb = x.view(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    a = torch.round(xb * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))).clamp(-127, 127)
    return (a.double() * (amax / 127.0).double()).view(m, k)


def int8_kernel_reference(x: torch.Tensor, lin: Int8Linear) -> torch.Tensor:
    """The int8 kernel's arithmetic in float64 (AVX-512: K % 64 == 0, AVX2: K % 32 == 0): y = s * sum (d a) q."""
    return (int8_rounded(x) @ lin.qweight.double().t()) * lin.scale.double()


def int4_kernel_reference(x: torch.Tensor, lin: Int4Linear) -> torch.Tensor:
    """The int4 kernel's arithmetic in float64: x rounded as int8_rounded says, times the centred
    codes (q - 8) s, plus the offsets z times the exact sums of x per group."""
    m, k = x.shape
    n, G = lin.out_features, k // lin.group
    xq = int8_rounded(x)
    q = lin.codes(0, n).double().view(n, G, lin.group) - 8.0
    s = lin.scale_zero[:, :n, 0].t().double()
    z = lin.scale_zero[:, :n, 1].t().double()
    centred = (q * s[..., None]).view(n, k)
    return xq @ centred.t() + x.double().view(m, G, lin.group).sum(-1) @ z.t()
