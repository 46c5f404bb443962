"""The vision tower's attention on the extension's vdpbf16ps kernel (cpu/csrc/flash_attn.cpp; the
plan's `vision_flash`: AVX512-BF16 without AMX, where the extension builds).

It takes the bf16 q, k, v of a bf16 GEMM and must give softmax(q k^T / sqrt(d)) v of them within
8e-3 of the output's scale (max |o|) against fp32 SDPA on the same bf16 values (measured 1-3e-3,
as torch's bf16 SDPA: both round the probabilities and the output to bf16), for head dims 16-128,
key counts not a multiple of its blocks of 64, several sequences with their own key lengths (keys
past a length left out whatever they hold; every query row computed), q/k/v read through the strided
views a fused qkv product gives. Bad shapes are refused with a message. A SiglipAttention the plan
hands the kernel runs it from 64 keys on (the 2x2 windows of 4.6's merger stay on SDPA), with a
mask only when it marks a prefix of each sequence, within the same tolerance of its SDPA path."""
import pytest
import torch
import torch.nn.functional as F

from minicpmv.cpu import native
from minicpmv.cpu.isa import detect
from minicpmv.cpu.plan import rule_plan
from minicpmv.layers.weight_formats import Bf16Linear
from minicpmv.models.siglip import SiglipAttention, key_lengths

HERE = detect()
PLAN = rule_plan(HERE)
TOL = 8e-3


def kernels():
    """The extension where it has the unit; elsewhere None, after checking the kernel refuses to run."""
    mod = native.quant_kernels(HERE) if PLAN.native_kernels else None
    if mod is not None and not mod.bf16_dot_ok():
        q = torch.zeros(1, 64, 1, 16, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            mod.bf16_attention(q, q, q, [], 0.25)
    return mod if mod is not None and mod.bf16_dot_ok() else None


def reference(q, k, v, lengths):
    N, L = q.shape[:2]
    mask = None if not lengths else (torch.arange(L)[None] < torch.tensor(lengths)[:, None])[:, None, None]
    o = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)), attn_mask=mask)
    return o.transpose(1, 2).reshape(N, L, -1)


def qkv_views(N, L, H, d, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(N, L, 3 * H * d, generator=g) * 1.5).bfloat16()  # as a fused product leaves them
    return [t.reshape(N, L, H, d) for t in qkv.split(H * d, -1)]


def test_the_plan_runs_it_where_the_cpu_has_the_unit():
    assert PLAN.vision_flash == (PLAN.bf16_dot and PLAN.vision_bf16)
    # AVX512-BF16 without AMX: the extension's kernel; AMX machines keep torch's SDPA (bf16 on the tiles)
    unit = HERE.at_least("avx512_bf16") and not HERE.at_least("amx")
    assert PLAN.vision_flash == (kernels() is not None and unit)


@pytest.mark.parametrize("N,L,H,d,lengths", [
    (1, 1, 1, 72, []), (2, 5, 3, 72, [5, 3]), (1, 64, 2, 64, []), (2, 100, 3, 16, [100, 37]),
    (1, 130, 2, 128, []), (1, 200, 2, 96, [129]), (3, 67, 2, 80, [1, 66, 67]), (1, 1024, 4, 72, [1000])])
def test_the_kernel_gives_fp32_attention_of_the_bf16_values(N, L, H, d, lengths):
    mod = kernels()
    if mod is None:
        assert not PLAN.vision_flash  # torch's SDPA runs the vision attention here
        return
    q, k, v = qkv_views(N, L, H, d, seed=L + d)
    o = mod.bf16_attention(q, k, v, lengths, d ** -0.5)
    assert o.dtype == torch.bfloat16 and o.shape == (N, L, H * d) and o.is_contiguous()
    ref = reference(q, k, v, lengths)
    assert (o.float() - ref).abs().max() <= TOL * ref.abs().max()
    if lengths and min(lengths) < L:  # keys past a sequence's length are left out, whatever they hold
        k2, v2 = k.clone(), v.clone()
        for n, m in enumerate(lengths):
            k2[n, m:], v2[n, m:] = 1e4, float("nan")
        assert torch.equal(mod.bf16_attention(q, k2, v2, lengths, d ** -0.5), o)


def test_bad_shapes_are_refused_with_a_message():
    mod = kernels()
    if mod is None:
        assert not PLAN.vision_flash
        return
    q, k, v = qkv_views(1, 8, 2, 72, seed=0)
    with pytest.raises(RuntimeError, match="one key length per sequence"):
        mod.bf16_attention(q, k, v, [8, 8], 0.1)
    with pytest.raises(RuntimeError, match="key lengths must be in 1..L"):
        mod.bf16_attention(q, k, v, [9], 0.1)
    with pytest.raises(RuntimeError, match="even and at most 128"):
        big = torch.zeros(1, 8, 2, 130, dtype=torch.bfloat16)
        mod.bf16_attention(big, big, big, [], 0.1)
    with pytest.raises(RuntimeError, match="strides must be even"):
        odd = torch.zeros(1, 8, 2, 71, dtype=torch.bfloat16)
        mod.bf16_attention(odd, odd, odd, [], 0.1)
    with pytest.raises(RuntimeError, match="bf16"):
        mod.bf16_attention(q.float(), k.float(), v.float(), [], 0.1)
    with pytest.raises(RuntimeError, match="one shape"):
        mod.bf16_attention(q, k[:, :4], v, [], 0.1)
    wide = torch.zeros(1, 8, 2 * 72 + 1, dtype=torch.bfloat16)[..., :144].reshape(1, 8, 2, 72)  # rows 145 apart
    with pytest.raises(RuntimeError, match="strides must be even"):
        mod.bf16_attention(wide, wide, wide, [], 0.1)


def test_key_lengths_only_for_prefix_masks():
    assert key_lengths(None, 2, 5) == []
    mask = (torch.arange(5)[None] < torch.tensor([5, 2])[:, None])[:, None, None]
    assert key_lengths(mask, 2, 5) == [5, 2]
    holes = mask.clone()
    holes[0, 0, 0, 1] = False
    assert key_lengths(holes, 2, 5) is None
    empty = mask.clone()
    empty[1] = False
    assert key_lengths(empty, 2, 5) is None


@pytest.mark.parametrize("L,prefix", [(130, True), (130, False), (4, True)])
def test_siglip_attention_takes_the_kernel_from_64_keys(L, prefix):
    mod = kernels()
    if mod is None:
        assert not PLAN.vision_flash
        return
    torch.manual_seed(L)
    attn = SiglipAttention(144, 2).eval()  # two heads of 72, as SigLIP's
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):  # as cpu/apply.py leaves them
        lin = getattr(attn, name)
        setattr(attn, name, Bf16Linear.of(lin.weight.detach().bfloat16(), lin.bias.detach()))
    attn.sdpa_dtype = torch.bfloat16
    lengths = torch.tensor([L, L - 3])
    mask = torch.arange(L)[None] < lengths[:, None]
    if not prefix:
        mask[0, 0] = False
    mask = mask[:, None, None]
    x = torch.randn(2, L, 144)
    calls = []

    class Spy:
        def bf16_attention(self, *args):
            calls.append(args[3])
            return mod.bf16_attention(*args)

    with torch.inference_mode():
        sdpa = attn(x, mask)
        attn.flash = Spy()
        got = attn(x, mask)
    assert calls == ([[L, L - 3]] if L >= native.FLASH_MIN_KEYS and prefix else [])
    assert (got - sdpa).abs().max() <= TOL * sdpa.abs().max()
