"""The few-row int8 / int4 kernels' arithmetic in float64 and their refusals of bad inputs (cpu/csrc/quant_gemv.cpp on AVX-512,
cpu/csrc/avx2_gemv.cpp on AVX2: both round the activations the same way), for their tests."""
import pytest
import torch

from minicpmv.layers.weight_formats import Int4Linear, Int8Linear


def prompts_round(model, fmt: str) -> bool:
    """Whether a quantized model's prompts (more rows than a decode batch) run the module's kernel,
    activations rounded to int8 per 32 inputs as llama.cpp rounds them (the AVX2 plan: faster than a
    GEMM on the widened matrix there), rather than the exact fp32 product with the widened matrix."""
    from minicpmv.cpu import native

    plan = getattr(model, "kernel_plan", None)
    return plan is not None and (plan.native_kernels or plan.avx2_gemv) and plan.module_rows(fmt) > native.ROWS


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


def refuses_bad_inputs(mod) -> None:
    """`mod`'s int8_mm / int4_mm refuse a wrong dtype, width or scale layout with a message."""
    lin = Int8Linear(torch.randn(8, 32), None)
    with pytest.raises(RuntimeError, match="fp32"):
        mod.int8_mm(torch.randn(1, 32).bfloat16(), lin.qweight, lin.scale)
    with pytest.raises(RuntimeError, match="columns"):
        mod.int8_mm(torch.randn(1, 48), lin.qweight, lin.scale)
    q4 = Int4Linear(torch.randn(8, 64), None, group=32)
    with pytest.raises(RuntimeError, match="scale_zero"):
        mod.int4_mm(torch.randn(1, 64), q4.qweight, q4.scale_zero, 64)


def decodes_like_the_exact_products(model, quant, fmt: str) -> None:
    """24 greedy steps of `model` through its quantized layers' few-row kernels against the same
    model whose `quant` layers then run the exact fp32 product with their dequantized matrices: the
    top token of >= 75% of the forced steps and a median step error <= 0.1 of the logit scale (the
    activations' int8 rounding, which a tiny random model amplifies)."""
    from format_accuracy import forced_logits, greedy

    prompt = [5, 17, 99, 3, 41, 8]
    tokens = greedy(model, prompt, 24)
    fast = forced_logits(model, prompt, tokens)
    for m in quant:
        m.native, m.gemm_dtype, m.kernel_rows = None, torch.float32, 0
    exact = forced_logits(model, prompt, tokens)
    steps = (fast - exact).abs().amax(-1) / exact.abs().max()
    agree = (fast.argmax(-1) == exact.argmax(-1)).float().mean()
    print(f"{fmt}: logit error per step {steps.median():.2e} median, {steps.max():.2e} max of the logit scale; "
          f"top token agreement {agree:.3f}")
    assert agree >= 0.75
    assert steps.median() <= 0.1
