"""The AVX-512 few-row kernels for bf16/int8/int4 matrices (cpu/native.py, cpu/csrc/quant_gemv.cpp).

On a CPU that has what they need (AVX-512 F/BW/VL/DQ, VNNI, VBMI: this project's Xeon and Zen 5
machines) they are built once and must give the fp32 product with the dequantized matrix:
  * bf16: exact products of fp32 activations with the bf16 weights, fp32 sums: within 1e-6; on
    AVX512-BF16 without AMX, one to eight rows on vdpbf16ps with the activations rounded to bf16:
    within 1e-5 of that arithmetic, 1e-2 of the exact product;
  * int8, K % 64 == 0: activations rounded to int8 per block of 32 inputs (max|x| / 127, as llama.cpp's
    Q8_0 dot products round them), exact int32 block sums: within 1e-5 of max|y| of that arithmetic
    done in float64, and within 2e-2 of the fp32 product (measured 4e-3 to 1e-2); other K: fp32
    activations and sums, within 1e-5 (measured 2-5e-7);
  * int4: activations rounded as the int8 kernel rounds them, codes multiplied as q - 8 (centred),
    exact int32 block sums, the offsets times the exact fp32 group sums of x: within 1e-5 of max|y|
    of that arithmetic done in float64, within 2e-2 of the fp32 product (measured 6e-3 to 1.5e-2);
  * the int4 widening for prompts (W^T from the packed blocks): bit for bit the tensor-op one;
  * the decode helpers (RMSNorm, DeltaNet's conv step and gated delta step, the prompt's rule and
    bf16 activations): within 1e-6 of the tensor ops they replace, in both modules that hold them
    (the AVX-512 extension and the AVX2 module: one source on simd.h's vectors);
and a model loaded with weights="int8"/"int4" must route its few-row products through them:
24 greedy steps of the tiny 4.6 through them, forced through the same model whose quantized
matrices run the exact fp32 product with their dequantized matrices, agree on the top token of most
steps with a median logit error within 0.1 of the logit scale (the activations' rounding, which the
tiny random model amplifies). Where the CPU lacks them, the loader must keep torch's kernels and say why; the
reasons are checked on made-up CPUs everywhere."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from format_accuracy import forced_logits, greedy
from minicpmv.cpu import native
from minicpmv.cpu.isa import CpuInfo, detect
from minicpmv.cpu.plan import BF16, EVERY_ROW, PREFETCH, rule_plan
from minicpmv.layers.gated_delta import chunk_gated_delta_rule, l2_normalize, recurrent_gated_delta_step
from minicpmv.layers.weight_formats import Bf16Linear, Int4Linear, Int8Linear, QuantLinear
from minicpmv.loading import load_model
from quant_reference import (decodes_like_the_exact_products, int4_kernel_reference, int8_kernel_reference,
                             refuses_bad_inputs)
from tiny46 import build_tiny_46

HERE = detect()


USABLE = native.unusable(HERE) is None
FULL = frozenset(native.NEEDS) | {"avx2"}


def kernels():
    mod = native.quant_kernels(HERE)
    assert (mod is not None) == USABLE, native.describe()
    return mod


def helpers(isa: str):
    """The module of `isa` holding the decode helpers (both build cpu/csrc/decode_rows.cpp), or
    None where it cannot be built here (then its reason must say so)."""
    if isa == "avx512":
        return kernels()
    mod = native.avx2_kernels(HERE)
    assert (mod is not None) == (native.avx2_unusable(HERE) is None), native.describe_avx2()
    return mod


BOTH = pytest.mark.parametrize("isa", ["avx512", "avx2"])


def test_reasons_on_made_up_cpus(monkeypatch):
    def cpu(flags, level="avx512", forced=False):
        return CpuInfo(arch="x86_64", model="t", flags=frozenset(flags), detected="amx", level=level, forced=forced)
    assert "avx512_vnni" in native.unusable(cpu(FULL - {"avx512_vnni"}))
    assert "forced to avx2" in native.unusable(cpu(FULL, "avx2", forced=True))
    monkeypatch.setenv(native.ENV, "0")
    assert "MINICPMV_NATIVE=0" in native.unusable(cpu(FULL))
    monkeypatch.delenv(native.ENV)
    assert rule_plan(cpu(FULL - {"avx512vbmi"})).native_kernels is False


def test_each_torch_install_builds_in_its_own_folder(monkeypatch):
    """Two environments with the same torch version share no build folder: torch's builder recompiles a
    folder built for other include paths, so switching between them rebuilt the module inside each load
    (a server ready after 88 s instead of ~25, its process tree at 8.3 GB with the compilers, 2026-12-04)."""
    for ext in (native._AVX512, native._AVX2):
        key = ext.key(HERE)
        assert ext.key(HERE) == key
        with monkeypatch.context() as m:
            m.setattr(torch, "__file__", "/another/venv/lib/python3.11/site-packages/torch/__init__.py")
            assert ext.key(HERE) != key
        assert ext.key(dataclasses.replace(HERE, flags=HERE.flags | {"made_up"})) != key


def test_builds_here_or_says_why():
    mod = kernels()
    if USABLE:
        assert "minicpmv AVX-512 kernel" in native.describe()
    else:
        assert mod is None and "torch's kernels (" in native.describe()


@pytest.mark.parametrize("n,k", [(7, 64), (130, 96), (64, 256)])
def test_kernels_give_the_fp32_product_with_the_dequantized_matrix(n, k):
    mod = kernels()
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    l8, l4 = Int8Linear(w, None), Int4Linear(w, None, group=64 if k % 64 == 0 else 32)
    for m in (1, 2, 3, 5, 8):
        x = torch.randn(m, k, generator=g)
        x[0, :5] = 0.0  # a group with zeros still quantizes
        vnni = mod is not None and k % 64 == 0  # the int8 kernel's rounded activations
        if vnni:
            ref = int8_kernel_reference(x, l8)
            got = mod.int8_mm(x, l8.qweight, l8.scale).double()
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        if mod is not None:
            ref = int4_kernel_reference(x, l4)
            got = mod.int4_mm(x, l4.qweight, l4.scale_zero, l4.group)[:, :n].double()
            assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        for lin, tol in ((l8, 2e-2 if vnni else 1e-5), (l4, 2e-2)):
            ref = x @ lin.dequantize(0, n).t()
            if mod is None:  # no kernels on this CPU: the layer's own path is the one checked
                got = lin(x)
            else:
                got = (mod.int8_mm(x, lin.qweight, lin.scale) if lin is l8 else
                       mod.int4_mm(x, lin.qweight, lin.scale_zero, lin.group)[:, :n])
            err = (got - ref).abs().max() / ref.abs().max()
            assert err <= (tol if mod is not None else 2e-2), (lin.format, m, float(err))
    if mod is not None:  # each row's result whatever rows share the call (4-, 2- and 1-row passes)
        x = torch.randn(7, k, generator=g)
        whole = mod.int4_mm(x, l4.qweight, l4.scale_zero, l4.group)
        whole8 = mod.int8_mm(x, l8.qweight, l8.scale)
        for i in range(7):
            assert torch.equal(whole[i:i + 1], mod.int4_mm(x[i:i + 1], l4.qweight, l4.scale_zero, l4.group))
            assert torch.equal(whole8[i:i + 1], mod.int8_mm(x[i:i + 1], l8.qweight, l8.scale))
    if mod is not None:  # software prefetch (off, into L1, into L2) changes no bit: one-row walks, tiles
        wb, xs = w.bfloat16(), [torch.randn(m, k, generator=g) for m in (1, 5)]

        def products(x):
            got = [mod.int4_mm(x, l4.qweight, l4.scale_zero, l4.group), mod.int8_mm(x, l8.qweight, l8.scale)]
            return got + [mod.bf16_dot_mm(x, wb)] if mod.bf16_dot_ok() else got

        outs = []
        for mode in (0, 1, 2):
            mod.set_prefetch(mode)
            outs.append([p for x in xs for p in products(x)])
        mod.set_prefetch(PREFETCH[rule_plan(HERE).prefetch][0])
        assert all(torch.equal(a, b) for o in outs[1:] for a, b in zip(outs[0], o))
        with pytest.raises(RuntimeError, match="prefetch mode"):
            mod.set_prefetch(3)
    if mod is not None:  # prompts: the int4 matrix widened to W^T, bit for bit the tensor-op widening
        blocks = l4.qweight.shape[0] // 64
        for bf16 in (False, True):
            dt = torch.bfloat16 if bf16 else torch.float32
            wt = mod.int4_widen_t(l4.qweight, l4.scale_zero, l4.group, 0, blocks, bf16)
            assert wt.dtype == dt and torch.equal(wt[:, :n], l4.dequantize(0, n, dt).t())
        many = torch.randn(40, k, generator=g)
        l4.native, l4.kernel_rows, l4.gemm_dtype = mod, 0, torch.bfloat16
        fast = l4(many)
        l4.native = None
        assert torch.equal(fast, l4(many))
    if mod is not None:  # bf16 weights: exact products, fp32 sums
        wb = w.bfloat16()
        x = torch.randn(3, k, generator=g)
        ref = x @ wb.float().t()
        assert (mod.bf16_mm(x, wb) - ref).abs().max() <= 1e-6 * ref.abs().max()
    zero = torch.zeros(1, k)
    if mod is not None:
        bad = torch.randn(2, k, generator=g)
        bad[1, 3] = float("nan")
        out = mod.int4_mm(bad, l4.qweight, l4.scale_zero, l4.group)[:, :n]
        assert out[0].isfinite().all() and out[1].isnan().any()  # a NaN input stays visible
        out = mod.int8_mm(bad, l8.qweight, l8.scale)
        assert out[0].isfinite().all() and out[1].isnan().any()
        assert torch.equal(mod.int8_mm(zero, l8.qweight, l8.scale), torch.zeros(1, n))
        tiny = torch.full((1, k), 1e-41)  # a group this small must not overflow the rounding
        assert mod.int4_mm(tiny, l4.qweight, l4.scale_zero, l4.group).isfinite().all()
        # zeros beside tiny values still round to zero codes: the int8 product holds (int4's d * s
        # falls below fp32's denormals there, so it is only checked finite above)
        tiny[0, 1::2] = 0.0
        exact = tiny.double() @ l8.dequantize(0, n, torch.float64).t()
        assert (mod.int8_mm(tiny, l8.qweight, l8.scale).double() - exact).abs().max() <= 2e-2 * exact.abs().max()
        assert torch.equal(mod.int4_mm(zero, l4.qweight, l4.scale_zero, l4.group)[:, :n], torch.zeros(1, n))


@BOTH
def test_decode_helpers_match_the_tensor_ops(isa):
    """rms_norm (optionally gated), the DeltaNet conv step and the gated delta step against the
    tensor-op code they replace: within 1e-6 of the scale (measured 2-3e-7)."""
    mod = helpers(isa)
    if mod is None:
        return
    torch.manual_seed(0)
    x, w, gate = torch.randn(3, 5, 48), torch.randn(48), torch.randn(3, 5, 48)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert (mod.rms_norm(x, w, 1e-6) - ref).abs().max() <= 1e-6 * ref.abs().max()
    ref_gated = ref * F.silu(gate)
    assert (mod.rms_norm(x, w, 1e-6, gate) - ref_gated).abs().max() <= 1e-6 * ref_gated.abs().max()
    B, Hk, Hv, dk, dv, K = 2, 4, 8, 24, 32, 4
    C = 2 * Hk * dk + Hv * dv
    window, xt, cw = torch.randn(B, C, K - 1), torch.randn(B, C), torch.randn(C, K) * 0.5
    y, nxt = mod.conv_step(window, xt, cw)
    full = torch.cat([window, xt[..., None]], -1)
    ref = F.silu((full * cw).sum(-1))
    assert (y - ref).abs().max() <= 1e-6 * ref.abs().max() and torch.equal(nxt, full[..., 1:])
    g, beta = -torch.rand(B, Hv), torch.rand(B, Hv)
    state = torch.randn(B, Hv, dk, dv)
    expected_state = state.clone()
    o = mod.delta_step(y, g, beta, state, Hk, dk ** -0.5, 1e-6)
    q, k, v = torch.split(y, [Hk * dk, Hk * dk, Hv * dv], -1)
    q = q.reshape(B, Hk, dk).repeat_interleave(Hv // Hk, 1)
    k = k.reshape(B, Hk, dk).repeat_interleave(Hv // Hk, 1)
    ref = recurrent_gated_delta_step(l2_normalize(q) * dk ** -0.5, l2_normalize(k), v.reshape(B, Hv, dv), g, beta,
                                     expected_state)
    assert (o - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert (state - expected_state).abs().max() <= 1e-6 * expected_state.abs().max()


@BOTH
def test_prompt_conv_matches_the_tensor_ops(isa):
    """conv_prompt (a prompt's causal conv + silu, continuing from the cached inputs) on fp32 rows and
    on bf16 rows of a strided projection: within 1e-6 of the scale of the tap-by-tap fp32 tensor ops."""
    mod = helpers(isa)
    if mod is None:
        return
    torch.manual_seed(1)
    B, T, C, K = 2, 7, 48, 4
    wide = torch.randn(B, T, C + 16)  # the projection's row holds more than the conv's channels
    x, past, w = wide[..., :C], torch.randn(B, K - 1, C), torch.randn(K, C) * 0.5
    for rows in (x, x.bfloat16()):
        window = torch.cat([past, rows.float()], 1)
        ref = F.silu(sum(window[:, j:j + T] * w[j] for j in range(K)))
        y = mod.conv_prompt(rows, past, w)
        assert y.dtype == torch.float32 and (y - ref).abs().max() <= 1e-6 * ref.abs().max()
    with pytest.raises(RuntimeError, match="multiple of 16"):
        mod.conv_prompt(x[..., :40], past[..., :40].contiguous(), w[:, :40].contiguous())


def conv_rows(B, T, Hk, Hv, dk, dv):
    """Random conv outputs [B, T, C] as the prompt rule reads them (q, k of Hk heads, v of Hv), and
    g, beta [B, T, Hv]; the first token's decay strong enough to leave denormals in the state."""
    y = torch.randn(B, T, 2 * Hk * dk + Hv * dv)
    g, beta = -torch.rand(B, T, Hv) * 3, torch.rand(B, T, Hv)
    g[:, 0] = -120.0  # exp(g) under the smallest normal fp32
    return y, g, beta


@pytest.mark.parametrize("B,T", [(1, 1), (1, 5), (2, 70)])
@BOTH
def test_prompt_delta_rule_matches_the_chunked_form(B, T, isa):
    """delta_rule_prompt (a CPU plan's prompt rule, on the conv rows) against the chunked form the
    fp32 path runs on torch's l2-normalised q and k: outputs and final states within 2e-5 of their
    scale (measured ~1e-6), the state advanced in place, finite through denormal decays; value head
    h reads key head h // 2 here."""
    mod = helpers(isa)
    if mod is None:
        return
    torch.manual_seed(T)
    Hk, Hv, dk, dv = 2, 4, 32, 48
    y, g, beta = conv_rows(B, T, Hk, Hv, dk, dv)
    q, k, v = torch.split(y, [Hk * dk, Hk * dk, Hv * dv], -1)
    q = l2_normalize(q.reshape(B, T, Hk, dk).repeat_interleave(2, 2)) * dk ** -0.5
    k = l2_normalize(k.reshape(B, T, Hk, dk).repeat_interleave(2, 2))
    state = torch.randn(B, Hv, dk, dv)
    ref, ref_state = chunk_gated_delta_rule(q.transpose(1, 2), k.transpose(1, 2),
                                            v.reshape(B, T, Hv, dv).transpose(1, 2), g.transpose(1, 2),
                                            beta.transpose(1, 2), state.clone(), chunk_size=16)
    work = state.clone()
    out = mod.delta_rule_prompt(y, g, beta, work, Hk, dk ** -0.5, 1e-6)
    assert out.shape == (B, T, Hv, dv) and out.isfinite().all()
    assert (out - ref.transpose(1, 2)).abs().max() <= 2e-5 * ref.abs().max()
    assert (work - ref_state).abs().max() <= 2e-5 * ref_state.abs().max()
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        mod.delta_rule_prompt(y, g, beta, work.transpose(2, 3), Hk, dk ** -0.5, 1e-6)
    with pytest.raises(RuntimeError, match="q, k and v"):
        mod.delta_rule_prompt(y[..., 1:].contiguous(), g, beta, work, Hk, dk ** -0.5, 1e-6)


@pytest.mark.parametrize("dv", [48, 96, 128])
@BOTH
def test_prompt_delta_rule_is_the_decode_steps_arithmetic_token_after_token(dv, isa):
    """The prompt rule normalises q and k as the decode step does and sums the next token's S^T k
    while it writes the state (value columns in blocks of 16, 32 or 64): a prompt of T tokens gives
    the outputs and state of T decode steps (delta_step), bit for bit."""
    mod = helpers(isa)
    if mod is None:
        return
    torch.manual_seed(dv)
    B, T, Hk, Hv, dk = 2, 9, 2, 6, 32
    y, g, beta = conv_rows(B, T, Hk, Hv, dk, dv)
    state = torch.randn(B, Hv, dk, dv)
    whole = state.clone()
    out = mod.delta_rule_prompt(y, g, beta, whole, Hk, dk ** -0.5, 1e-6)
    steps = state.clone()
    one = [mod.delta_step(y[:, t].contiguous(), g[:, t].contiguous(), beta[:, t].contiguous(), steps, Hk,
                          dk ** -0.5, 1e-6) for t in range(T)]
    assert torch.equal(out, torch.stack(one, 1)) and torch.equal(whole, steps)
    assert not torch.equal(whole, state)


@BOTH
def test_prompt_activations_round_once_to_bf16(isa):
    """silu(gate) * up and the tanh GELU on bf16 hidden tensors: fp32 math, one rounding. silu_mul
    is bit for bit torch's fp32 product rounded (what down_proj received before); the GELU is
    within one bf16 step of the float64 value everywhere (it differs from torch's on ~7% of values,
    in the negative tail where torch's 0.5 x (1 + tanh u) loses digits or cancels to 0)."""
    mod = helpers(isa)
    if mod is None:
        return
    torch.manual_seed(0)
    gate_up = (torch.randn(3, 7, 2 * 96) * 4).bfloat16()
    gate, up = gate_up.float().chunk(2, dim=-1)
    assert torch.equal(mod.silu_mul_bf16(gate_up), (F.silu(gate) * up).bfloat16())
    x = (torch.randn(5, 4304 // 16 * 16) * 4).bfloat16()
    xd = x.double()  # the tanh GELU as x sigmoid(2u): 0.5 x (1 + tanh u) cancels to 0 for x << 0, even in fp64
    exact = xd * torch.sigmoid(2 * 0.7978845608028654 * (xd + 0.044715 * xd ** 3))
    ours = mod.gelu_tanh_bf16_(x.clone()).double()
    step = exact.abs().clamp_min(1e-30) * 2 ** -7  # one bf16 step at each value
    assert ((ours - exact).abs() <= step).all()
    assert torch.equal(mod.gelu_tanh_bf16_(torch.tensor([[0.0] * 16]).bfloat16()), torch.zeros(1, 16).bfloat16())
    nan = mod.silu_mul_bf16(torch.full((1, 32), float("nan")).bfloat16())
    assert nan.isnan().all()
    with pytest.raises(RuntimeError, match="bf16"):
        mod.silu_mul_bf16(gate_up.float())
    with pytest.raises(RuntimeError, match="multiple of 16"):
        mod.gelu_tanh_bf16_(torch.zeros(2, 24).bfloat16())


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_moe_experts_run_them_on_their_stored_bytes(fmt):
    """QuantExperts: few tokens per expert through the extension's products, many (int4) through its
    widening: the outputs of the exact fp32 products with the dequantized experts, within 2e-4 of
    their scale where they widen and 3e-2 where the few-row products round the activations to int8."""
    mod = kernels()
    if mod is None:
        return
    from minicpmv.layers.moe import Experts, route
    from minicpmv.layers.moe_quant import QuantExperts

    torch.manual_seed(1)
    E, D, I = 4, 64, 32
    ex = Experts(E, D, I)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.05)
        ex.down_proj.normal_(0, 0.05)
    q = QuantExperts(E, D, I, fmt)
    q.load_stream("gate_up_proj", ex.gate_up_proj.detach().bfloat16())
    q.load_stream("down_proj", ex.down_proj.detach().bfloat16())
    q.gemm_dtype, q.kernel_rows = torch.float32, 0  # beyond the extension's rows: widen + fp32 GEMM
    for n in (1, 5, 40):
        x = torch.randn(n, D)
        weights, chosen = route(torch.randn(n, E), 2)
        with torch.no_grad():
            q.native, q.native_rows = None, 0
            exact = q(x, chosen, weights)  # the tensor-op widening, fp32 products
            q.native, q.native_rows = mod, native.ROWS
            fast = q(x, chosen, weights)
        tol = 3e-2 if n <= native.ROWS else 2e-4
        assert (fast - exact).abs().max() <= tol * exact.abs().max(), (fmt, n)


AMX = USABLE and HERE.at_least("amx")


def test_amx_rows_give_the_product_of_the_bf16_rounded_activations():
    """5-16 rows of a bf16 product on AMX tiles (the plan's `amx_rows` where the CPU has AMX): the
    fp32 product of the bf16-rounded activations with the weights within 1e-5 of max|y| (fp32 sums
    in tile order), weight rows past the last 64 on the FMA kernel, each row's result the same
    whatever the other rows, and the plan routes 5-16 rows of a Bf16Linear there."""
    assert (rule_plan(HERE).amx_rows > 0) == AMX
    if not AMX:
        return
    mod = kernels()
    assert mod.amx_rows_ok()
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(200, 96, generator=g) * 0.1).bfloat16()  # 3 tiles of 64 rows + 8 rows on the FMA kernel
    x = torch.randn(16, 96, generator=g)
    ref = x.bfloat16().float() @ w.float().t()
    for m in (1, 5, 8, 16):
        y = mod.bf16_amx_mm(x[:m].contiguous(), w)
        assert (y - ref[:m]).abs().max() <= 1e-5 * ref[:m].abs().max(), m
        if m > 1:
            assert torch.equal(y[0], mod.bf16_amx_mm(x[:1].contiguous(), w)[0])  # batch-invariant rows
    with pytest.raises(RuntimeError, match="multiple of 32"):
        mod.bf16_amx_mm(torch.randn(2, 48), torch.randn(8, 48).bfloat16())
    with pytest.raises(RuntimeError, match="rows 1..16"):
        mod.bf16_amx_mm(torch.randn(17, 96), w)
    lin = Bf16Linear.of(w, None)
    lin.native, lin.amx_rows = mod, 5
    seen = []
    real = mod.bf16_amx_mm

    class Spy:
        def __getattr__(self, name):
            return getattr(mod, name)

        def bf16_amx_mm(self, a, b):
            seen.append(a.shape[0])
            return real(a, b)
    lin.native = Spy()
    for m in (1, 4, 5, 16, 17):
        lin(torch.randn(m, 96))
    assert seen == [5, 16]


def test_bf16_dot_rows_give_the_product_of_the_bf16_rounded_activations():
    """1-8 decode rows on vdpbf16ps (the plan's `bf16_dot`: AVX512-BF16 without AMX): the product of
    the bf16-rounded activations with the weights within 1e-5 of max|y| of that arithmetic in
    float64 (fp32 sums), within 1e-2 of the exact product (measured ~2e-3), tiles of 4 weight rows
    and the rows past them alike, each row's result the same whatever the other rows, a NaN
    confined to its row; a K not a multiple of 32 refused; a Bf16Linear the plan tunes runs it."""
    from minicpmv.cpu.apply import tune_bf16

    plan = rule_plan(HERE)
    assert plan.bf16_dot == (USABLE and HERE.at_least("avx512_bf16") and not HERE.at_least("amx"))
    mod = kernels()
    if mod is None:
        return
    assert mod.bf16_dot_ok() == ("avx512_bf16" in HERE.flags)
    if not mod.bf16_dot_ok():
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            mod.bf16_dot_mm(torch.randn(1, 32), torch.randn(4, 32).bfloat16())
        return
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(203, 96, generator=g) * 0.1).bfloat16()  # 50 tiles of 4 rows, then 3 rows
    x = torch.randn(8, 96, generator=g)
    ref, exact = x.bfloat16().double() @ w.double().t(), x.double() @ w.double().t()
    for m in (1, 2, 3, 4, 5, 8):
        y = mod.bf16_dot_mm(x[:m].contiguous(), w).double()
        assert (y - ref[:m]).abs().max() <= 1e-5 * ref[:m].abs().max(), m
        assert (y - exact[:m]).abs().max() <= 1e-2 * exact[:m].abs().max(), m
        for r in range(m):  # batch-invariant rows (every place in a 4 x 4 tile's sums)
            assert torch.equal(y[r].float(), mod.bf16_dot_mm(x[r:r + 1].contiguous(), w)[0])
    xn = x[:3].clone()
    xn[1, 5] = float("nan")
    yn = mod.bf16_dot_mm(xn, w)
    assert yn[1].isnan().all() and torch.equal(yn[[0, 2]], mod.bf16_dot_mm(x[[0, 2]].contiguous(), w))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        mod.bf16_dot_mm(torch.randn(1, 48), torch.randn(4, 48).bfloat16())
    lin = Bf16Linear.of(w, None)
    tune_bf16(lin, plan, mod)
    assert lin.bf16_dot == plan.bf16_dot
    if plan.bf16_dot:
        assert torch.equal(lin(x[:2]), mod.bf16_dot_mm(x[:2].contiguous(), w))


def test_a_matrix_in_tiles_gives_the_plain_matrixs_rows_bit_for_bit():
    """The bf16_dot plan stores its bf16 matrices in the extension's tiles of 4 rows ([N/4, K/32, 4,
    32], the last N % 4 rows plain): back to plain exactly (into a given tensor too); its vdpbf16ps
    rows equal the plain matrix's bit for bit at 1-10 rows with 0-3 rows past the last tile; a
    Bf16Linear the plan tunes holds the tiles and gives its plain twin's products (2 and 9 rows on
    the tiles, 120 through oneDNN on the untiled copy) and the plain rows as a tied embedding."""
    from minicpmv.cpu.apply import tune_bf16
    from minicpmv.layers import weight_formats

    plan = rule_plan(HERE)
    assert plan.bf16_tiles == plan.bf16_dot
    mod = kernels()
    if mod is None or not mod.bf16_dot_ok():
        return
    g = torch.Generator().manual_seed(8)
    for n, k in ((8, 64), (203, 96), (66, 128), (3, 64)):
        w = (torch.randn(n, k, generator=g) * 0.1).bfloat16()
        t = mod.bf16_tile(w)
        if n >= 4:  # tile 0, columns 32..63: rows 0-3 side by side
            assert torch.equal(t.view(-1)[128:256].view(4, 32), w[:4, 32:64])
        assert torch.equal(t[n - n % 4:], w[n - n % 4:])
        assert torch.equal(mod.bf16_untile(t), w)
        out = torch.zeros_like(w)
        assert mod.bf16_untile(t, out).data_ptr() == out.data_ptr() and torch.equal(out, w)
        for m in range(1, 11):
            x = torch.randn(m, k, generator=g)
            assert torch.equal(mod.bf16_dot_mm(x, t, True), mod.bf16_dot_mm(x, w)), (n, k, m)
    with pytest.raises(RuntimeError, match="shape"):
        mod.bf16_untile(t, torch.empty(n + 1, k, dtype=torch.bfloat16))
    w, b = (torch.randn(203, 96, generator=g) * 0.1).bfloat16(), torch.randn(203, generator=g)
    lin, twin = Bf16Linear.of(w, b), Bf16Linear.of(w, b)
    # the vdpbf16ps rows as the plan of an AVX512-BF16 CPU without AMX has them (on AMX ones too, which
    # have the unit but keep the FMA rows)
    dot = dataclasses.replace(plan, bf16_dot=True, bf16_dot_rows=96, bf16_tiles=True, amx_rows=0)
    tune_bf16(lin, dot, mod)
    tune_bf16(twin, dataclasses.replace(dot, bf16_tiles=False), mod)
    both = Bf16Linear.of(w, b)  # a plan with AMX rows too: they read plain rows, so not the tiled matrix's
    tune_bf16(both, dataclasses.replace(dot, amx_rows=5), mod)
    assert both.tiles and both.amx_rows == 0
    assert lin.tiles and not twin.tiles and torch.equal(lin.plain_weight(), w) and torch.equal(twin.weight, w)
    weight_formats._scratch.__dict__.pop("buf", None)
    with torch.inference_mode():  # the untile scratch first made in inference mode (an engine's prompt),
        x = torch.randn(120, 96, generator=g)
        assert torch.equal(lin(x), twin(x))
    for rows in (2, 9, 120):  # then written outside it
        x = torch.randn(rows, 96, generator=g)
        assert torch.equal(lin(x), twin(x)) and torch.equal(lin.bf16_product(x), twin.bf16_product(x)), rows
    ids = torch.tensor([[0, 202], [199, 200], [57, 57]])
    assert torch.equal(lin.embedding(ids), w[ids].float()) and torch.equal(twin.embedding(ids), w[ids].float())


def test_short_prompts_and_batched_decode_run_the_bf16_dot_rows_up_to_the_plans_bound():
    """On the bf16_dot plan, 9 to `bf16_dot_rows` rows (a short prompt, a decode batch of more than
    8) multiply through the same vdpbf16ps rows as one decode row, in forward and in bf16_product
    (bias added to the fp32 sums, then rounded once), within 1e-5 of max|y| of that arithmetic in
    float64; past the bound, and off that plan, oneDNN's GEMM as before."""
    from minicpmv.cpu.apply import tune_bf16

    plan = rule_plan(HERE)
    assert plan.bf16_dot_rows == (96 if plan.bf16_dot else 0)
    mod = kernels()
    if mod is None or not plan.bf16_dot:
        return
    g = torch.Generator().manual_seed(7)
    w, b = (torch.randn(70, 64, generator=g) * 0.1).bfloat16(), torch.randn(70, generator=g)
    lin = Bf16Linear.of(w, b)
    tune_bf16(lin, plan, mod)
    assert lin.dot_rows == 96
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(mod, name)

        def bf16_dot_mm(self, a, wt, tiled=False):
            seen.append(a.shape[0])
            return mod.bf16_dot_mm(a, wt, tiled)
    lin.native = Spy()
    for rows in (9, 40, 96):
        x = torch.randn(1, rows, 64, generator=g)
        ref = x[0].bfloat16().double() @ w.double().t() + b.double()
        y, yb = lin(x), lin.bf16_product(x)
        assert y.shape == yb.shape == (1, rows, 70) and y.dtype == torch.float32 and yb.dtype == torch.bfloat16
        assert (y[0].double() - ref).abs().max() <= 1e-5 * ref.abs().max(), rows
        assert torch.equal(yb, y.bfloat16())
    assert seen == [9, 9, 40, 40, 96, 96]
    seen.clear()
    lin(torch.randn(97, 64))
    lin.bf16_product(torch.randn(97, 64))
    assert seen == []
    lin.bf16_dot = False  # off the plan (the FMA rows' CPUs): 40 rows back on oneDNN
    lin(torch.randn(40, 64))
    lin.bf16_product(torch.randn(40, 64))
    assert seen == []


def test_bad_inputs_are_refused_with_a_message():
    mod = kernels()
    if mod is None:
        return
    refuses_bad_inputs(mod)


def test_a_16_bit_model_on_the_bf16_plan_decodes_through_them(tmp_path):
    folder = build_tiny_46(tmp_path / "bf16", seed=1, dtype=torch.bfloat16)
    model, _ = load_model(folder, "auto", "cpu", progress=False)
    bf16 = [m for name, m in model.named_modules()
            if type(m) is Bf16Linear and name.startswith(model.per_token_prefixes)]
    if model.kernel_plan.text16 != BF16:  # this CPU's plan keeps another 16-bit kernel
        assert not bf16
        return
    assert bf16 and all((m.native is not None) == USABLE for m in bf16)
    assert all(m.bf16_dot == model.kernel_plan.bf16_dot for m in bf16 if m.in_features % 32 == 0)
    x = torch.randn(2, bf16[0].in_features)
    fast = bf16[0](x)
    # vdpbf16ps rows (AVX512-BF16 without AMX) multiply the bf16-rounded activations, else exact ones
    exact = (x.bfloat16().float() if bf16[0].bf16_dot else x) @ bf16[0].plain_weight().float().t()
    assert (fast - exact).abs().max() <= 1e-5 * exact.abs().max()


def test_a_16_bit_model_in_tiles_reads_one_copy_and_gives_the_plain_models_numbers(tmp_path, monkeypatch):
    """On the bf16_dot plan the per-token bf16 matrices are stored in tiles and the input embedding
    tied to the lm_head reads the head's tiles (no second copy): a 120-token prompt (oneDNN on the
    untiled copies), 16 decode steps of one sequence and 3 sequences decoding together give the
    numbers of the same plan on plain matrices, bit for bit."""
    from minicpmv import loading
    from minicpmv.engine.engine import Engine
    from minicpmv.engine.sampling import SamplingParams
    from minicpmv.engine.sequence import Sequence
    from minicpmv.layers.weight_formats import TiedEmbedding

    plan = rule_plan(HERE)
    if not (plan.native_kernels and plan.bf16_tiles and plan.text16 == BF16 and kernels() is not None):
        return
    folder = build_tiny_46(tmp_path / "bf16", seed=1, dtype=torch.bfloat16)
    tiled, _ = load_model(folder, "auto", "cpu", progress=False)
    monkeypatch.setattr(loading, "choose", lambda isa=None: dataclasses.replace(plan, bf16_tiles=False))
    plain, _ = load_model(folder, "auto", "cpu", progress=False)
    monkeypatch.undo()
    head = tiled.lm_head
    assert head.tiles and not plain.lm_head.tiles and head.out_features % 4 != 0  # the last rows plain
    assert all(m.tiles for m in tiled.language_model.modules() if type(m) is Bf16Linear)
    embed = tiled.language_model.embed_tokens
    assert isinstance(embed, TiedEmbedding) and embed._head[0] is head and not list(embed.parameters())
    assert torch.equal(head.plain_weight(), plain.lm_head.weight)
    prompt = [int(t) for t in torch.randint(0, head.out_features, (120,), generator=torch.Generator().manual_seed(3))]
    prompt[-1] = head.out_features - 1  # a token whose embedding row sits past the last tile
    tokens = greedy(plain, prompt, 16)
    assert greedy(tiled, prompt, 16) == tokens
    assert torch.equal(forced_logits(tiled, prompt, tokens), forced_logits(plain, prompt, tokens))

    def together(model):
        engine = Engine(model, max_context=4096)
        seqs = [engine.add(Sequence(prompt[i:i + 20], SamplingParams(max_new_tokens=12, do_sample=False), []))
                for i in range(3)]
        while engine.has_work():
            engine.step()
        return [s.output_ids for s in seqs]
    assert together(tiled) == together(plain)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_quantized_model_decodes_through_them(tiny46_dir, fmt):
    """Whole model, 24 greedy steps: through the kernels against the same model whose quantized
    matrices run the exact fp32 product with their dequantized matrices. Both formats' rows round
    the activations to int8 per 32 inputs: the tiny random model turns the kernel's ~5e-3 per
    matrix into 2-10% of the logit scale a step (one step 30%), so: the top token of >= 75% of the
    forced steps (measured int8 0.875, int4 0.917) and a median step error <= 0.1 (measured int8 0.035,
    int4 0.043)."""
    model, _ = load_model(tiny46_dir, "auto", "cpu", progress=False, weights=fmt)
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not USABLE:  # the AVX2 module where the CPU has it (its run: tests/test_avx2_gemv.py), else torch's
        few = native.avx2_kernels(HERE)
        rows = 0 if few is None else model.kernel_plan.module_rows(fmt)
        assert rows in (0, 384 if fmt == "int8" else EVERY_ROW)  # the AVX2 rule: its kernels for prompts too
        assert quant and all(m.native is few and m.native_rows == rows for m in quant)
        return
    assert quant and all(m.native is kernels() for m in quant)
    assert all(m.native_rows == native.ROWS for m in quant)
    if fmt == "int4":  # the extension's widening makes widen + GEMM the better choice beyond its rows
        assert all(m.kernel_rows == native.ROWS for m in quant)
    decodes_like_the_exact_products(model, quant, fmt)
