"""GPTQ checkpoint format: packing facts from the spec (v40_v45 §9.3-9.5), exact round trips for
every variant, equality with GPTQModel's own packer/dequantizer when it is installed, and the
GPTQLinear kernels against the float dequantization."""
import itertools

import pytest
import torch

from minicpmv.quant.gptq_format import (GPTQSpec, convert_qzeros, default_g_idx, dequantize_gptq, pack_gptq,
                                        pack_qweight, pack_qzeros, unpack_gptq, unpack_qweight, unpack_qzeros)
from minicpmv.quant.gptq_linear import BF16_SCALES, GPTQLinear

VARIANTS = [(bits, gs, sym, desc_act, fmt)
            for bits, gs, sym, desc_act, fmt in itertools.product((4, 8), (32, 64, 128, -1), (True, False),
                                                                  (False, True), ("gptq", "gptq_v2"))]


def random_quantized(spec: GPTQSpec, K=256, N=64, seed=0):
    """A random layer already on its grid: (weight [N, K], scales [G, N], zeros [G, N], g_idx)."""
    g = torch.Generator().manual_seed(seed)
    G = spec.num_groups(K)
    scales = torch.rand(G, N, generator=g) * 0.02 + 0.005
    if spec.sym:
        zeros = torch.full((G, N), 2 ** (spec.bits - 1))
    else:
        zeros = torch.randint(1, spec.maxq + 1, (G, N), generator=g)  # v1 cannot hold a zero of 0 per field
    if spec.desc_act and spec.group_size != -1:
        g_idx = (torch.argsort(torch.randperm(K, generator=g)) // spec.group_len(K)).to(torch.int32)
    else:
        g_idx = default_g_idx(K, spec.group_size)
    codes = torch.randint(0, spec.maxq + 1, (K, N), generator=g)
    weight = (scales[g_idx.long()] * (codes - zeros[g_idx.long()])).t().contiguous()
    return weight, scales, zeros, g_idx, codes


def test_spec_facts_symmetric_4bit_zero_words():
    K, N = 256, 64
    for fmt, word in (("gptq", 0x77777777), ("gptq_v2", 0x88888888 - (1 << 32))):
        spec = GPTQSpec(4, 128, True, False, fmt)
        w, s, z, g, _ = random_quantized(spec, K, N)
        t = pack_gptq(w, s, z, g, spec)
        assert t["qzeros"].dtype == torch.int32 and bool((t["qzeros"] == word).all()), fmt
        assert t["qweight"].shape == (K // 8, N) and t["qzeros"].shape == (2, N // 8)
        assert t["scales"].dtype == torch.float16 and t["scales"].shape == (2, N)
        assert t["g_idx"].dtype == torch.int32 and torch.equal(t["g_idx"], torch.arange(K, dtype=torch.int32) // 128)


def test_bit_layout_low_bits_first():
    codes = torch.arange(16, dtype=torch.int32).view(16, 1).repeat(1, 8)  # K=16 rows, N=8
    words = pack_qweight(codes, 4)
    assert words.shape == (2, 8)
    assert words[0, 0].item() == 0x76543210 and words[1, 0].item() == 0xFEDCBA98 - (1 << 32)
    zeros = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert pack_qzeros(zeros, 4, "gptq_v2").item() == 0x87654321 - (1 << 32)
    assert pack_qzeros(zeros, 4, "gptq").item() == 0x76543210
    assert torch.equal(unpack_qweight(words, 4), codes)


@pytest.mark.parametrize("bits,gs,sym,desc_act,fmt", VARIANTS)
def test_pack_unpack_round_trip(bits, gs, sym, desc_act, fmt):
    spec = GPTQSpec(bits, gs, sym, desc_act, fmt)
    w, s, z, g, codes = random_quantized(spec, seed=bits + gs)
    t = pack_gptq(w, s, z, g, spec)
    got_codes, got_zeros = unpack_gptq(t["qweight"], t["qzeros"], bits, fmt)
    assert torch.equal(got_codes, codes.to(torch.int32))
    assert torch.equal(got_zeros, z.to(torch.int32))
    assert torch.equal(t["g_idx"], g)
    deq = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, fmt)
    ref = (s.half().float()[g.long()] * (codes - z[g.long()])).t()
    assert torch.equal(deq, ref)
    other = "gptq_v2" if fmt == "gptq" else "gptq"
    assert torch.equal(unpack_qzeros(convert_qzeros(t["qzeros"], bits, fmt, other), bits, other), z.to(torch.int32))


def test_v1_zero_of_zero_borrows_like_gptqmodel_and_still_round_trips():
    z = torch.tensor([[0, 3, 0, 15, 1, 0, 2, 9]])
    packed = pack_qzeros(z, 4, "gptq")
    assert torch.equal(unpack_qzeros(packed, 4, "gptq"), z.to(torch.int32))


@pytest.mark.parametrize("bits,gs,sym,desc_act,fmt", VARIANTS)
def test_pack_matches_gptqmodel(bits, gs, sym, desc_act, fmt):
    import gptqmodel as gq
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization import QuantizeConfig
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module

    K, N = 256, 64
    spec = GPTQSpec(bits, gs, sym, desc_act, fmt)
    w, s, z, g, _ = random_quantized(spec, K, N, seed=7)
    w = w + 0.3 * s[g.long()].t() * torch.randn(N, K, generator=torch.Generator().manual_seed(1))  # off-grid too
    lin = torch.nn.Linear(K, N, bias=False)
    lin.weight.data = w.clone()
    theirs = TorchLinear(bits=bits, group_size=spec.group_len(K), sym=sym, desc_act=desc_act, in_features=K,
                         out_features=N, bias=False)
    theirs.pack_block(lin, s.t().clone(), z.t().clone().to(torch.int32), g.clone())  # stores v2 zeros
    if fmt == "gptq":
        convert_gptq_v2_to_v1_format_module(theirs, QuantizeConfig(bits=bits))
    ours = pack_gptq(w, s, z, g, spec)
    assert torch.equal(ours["qweight"], theirs.qweight)
    assert torch.equal(ours["qzeros"], theirs.qzeros)
    assert torch.equal(ours["scales"], theirs.scales)
    assert torch.equal(ours["g_idx"], theirs.g_idx.to(torch.int32))
    del gq


@pytest.mark.parametrize("bits,gs,sym,desc_act", [(4, 32, True, False), (4, 128, False, True), (8, 64, False, True),
                                                  (4, -1, True, False), (8, -1, False, False)])
def test_dequantize_matches_gptqmodel(bits, gs, sym, desc_act):
    import gptqmodel  # noqa: F401  (the oracle must be installed)
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    K, N = 256, 64
    spec = GPTQSpec(bits, gs, sym, desc_act, "gptq_v2")  # GPTQModel's in-memory format is v2
    w, s, z, g, _ = random_quantized(spec, K, N, seed=3)
    t = pack_gptq(w, s, z, g, spec)
    theirs = TorchLinear(bits=bits, group_size=spec.group_len(K), sym=sym, desc_act=desc_act, in_features=K,
                         out_features=N, bias=False)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        setattr(theirs, name, t[name].clone())
    ref = theirs.dequantize_weight()  # [K, N], computed in the scales' fp16
    ours = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, "gptq_v2")  # fp32 math
    assert torch.equal(ours.t().to(ref.dtype), ref)  # one rounding of the same exact product


def layer_for(spec, K, N, seed=0, bias=False):
    w, s, z, g, _ = random_quantized(spec, K, N, seed)
    b = torch.randn(N, generator=torch.Generator().manual_seed(seed + 1)) * 0.1 if bias else None
    return GPTQLinear.from_tensors(pack_gptq(w, s, z, g, spec, b), spec, K, N)


@pytest.mark.parametrize("spec,K,N,expected", [
    (GPTQSpec(4, 128, True, False), 256, 64, "cpu_int4"),
    (GPTQSpec(4, 32, False, True), 256, 64, "cpu_int4"),    # act-order: inputs permuted once
    (GPTQSpec(4, -1, True, False), 512, 32, "cpu_int4"),    # one group of 512 -> kernel groups of 256
    (GPTQSpec(4, 64, True, False, "gptq_v2"), 128, 48, "cpu_int4"),
    (GPTQSpec(4, 32, True, False), 64, 8, "dequant"),       # out_features % 16 != 0
    (GPTQSpec(8, 128, False, True), 256, 64, "dequant"),
    (GPTQSpec(8, -1, True, False), 256, 32, "dequant"),
])
@pytest.mark.parametrize("isa", [None, "avx2"], ids=["this-cpu", "avx2"])
def test_gptq_linear_matches_dequantized_reference(spec, K, N, expected, isa):
    layer = layer_for(spec, K, N, bias=True).prepare(isa=isa)
    assert layer.backend == expected
    W = layer.dequantize(torch.float32)
    x = torch.randn(5, 3, K)
    ref = torch.nn.functional.linear(x, W, layer.bias.float())
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)):
        y = layer(x.to(dtype))
        assert y.dtype == dtype and y.shape == (5, 3, N)
        # torch's int4 kernel with bf16/fp16 scales (AVX2 arithmetic) computes in bf16/fp16; the AVX512-BF16
        # arithmetic keeps the exact fp32 weight (fp32 input: exact; bf16: one output rounding)
        tol = max(tol, 1.5e-2) if layer._rt.get("math") == BF16_SCALES else tol
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        assert rel < tol, (dtype, rel)
    dense = layer_for(spec, K, N, bias=True).prepare("dense")
    torch.testing.assert_close(dense(x), ref, rtol=1e-5, atol=1e-5)


def test_cpu_int4_kernel_equals_reference_kernel_semantics_exactly_in_bf16():
    """The AVX2 arithmetic (BF16_SCALES, what gptqmodel runs there): zero = (8 - z) * s with s rounded to
    bf16 first, the layer equals a hand-built call. (The AVX512-BF16 arithmetic is checked against
    gptqmodel itself, layer by layer, in test_gptq_roundtrip.py.)"""
    spec = GPTQSpec(4, 32, False, False, "gptq")
    layer = layer_for(spec, 128, 32, seed=5).prepare("cpu_int4", isa="avx2")
    assert layer._rt["math"] == BF16_SCALES
    codes, zeros = layer.codes_and_zeros()
    s = layer.scales.to(torch.bfloat16)
    sz = torch.stack([s, (8 - zeros).to(torch.bfloat16) * s], -1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 1)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    assert torch.equal(layer(x), torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz))


def test_bad_backend_and_shapes_are_reported():
    with pytest.raises(ValueError, match="divisible"):
        GPTQSpec(4, 128).shapes(100, 64)
    with pytest.raises(ValueError, match="cannot run"):
        layer_for(GPTQSpec(8, 32), 64, 32).prepare("cpu_int4")
    with pytest.raises(ValueError):
        GPTQSpec(3, 128)
