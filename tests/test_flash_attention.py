"""The vision tower's attention on the extension's vdpbf16ps kernel (cpu/csrc/flash_attn.cpp; the
plan's `vision_flash`: AVX512-BF16 without AMX, where the extension builds).

It takes the bf16 q, k, v of a bf16 GEMM and must give softmax(q k^T / sqrt(d)) v of them within
8e-3 of the output's scale (max |o|) against fp32 SDPA on the same bf16 values (measured 1-3e-3,
as torch's bf16 SDPA: both round the probabilities and the output to bf16), for head dims 16-128,
key counts not a multiple of its blocks of 64, several sequences with their own key lengths (keys
past a length left out whatever they hold; every query row computed), q/k/v read through the strided
views a fused qkv product gives. Bad shapes are refused with a message. A SiglipAttention the plan
hands the kernel runs it from 64 keys on (the 2x2 windows of 4.6's merger stay on SDPA), with a
mask only when it marks a prefix of each sequence, within the same tolerance of its SDPA path.

The text layers' causal kernel (`bf16_causal_attention`, the plan's `prompt_flash`) is held to the
same 8e-3 against fp32 attention with the causal mask, for grouped key heads (1-8 query heads per
key head), head dims up to 256, prompts after cached context, strided views; what a query must not
see leaves its output bit for bit the same. The 4.6's prompt through the engine (chunks after a
context included) runs it for every chunk, within the bf16 path's 3% of its prefill logits on SDPA."""
import pytest
import torch
import torch.nn.functional as F

from minicpmv.cpu import native
from minicpmv.cpu.isa import detect
from minicpmv.cpu.plan import rule_plan
from minicpmv.engine.engine import Engine
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence
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


def causal_reference(q, k, v, offset):
    """fp32 attention of q [T, H, d] over k / v [offset + T, Hkv, d], query t seeing keys <= offset + t."""
    T, H, d = q.shape
    g = H // k.shape[1]
    qq, kk, vv = q.float().transpose(0, 1), *(t.float().transpose(0, 1).repeat_interleave(g, 0) for t in (k, v))
    mask = torch.arange(offset + T)[None] <= (offset + torch.arange(T))[:, None]
    return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=d ** -0.5).transpose(0, 1).reshape(T, H * d)


@pytest.mark.parametrize("T,offset,H,Hkv,d", [
    (2, 0, 8, 2, 256), (5, 0, 8, 2, 256), (70, 0, 8, 2, 256), (130, 37, 8, 2, 256), (64, 0, 4, 4, 72),
    (33, 100, 6, 2, 32), (200, 5, 8, 1, 128), (9, 3, 16, 2, 18), (1, 300, 8, 8, 64), (300, 0, 32, 8, 128)])
def test_the_causal_kernel_gives_fp32_attention_of_the_bf16_values(T, offset, H, Hkv, d):
    mod = kernels()
    if mod is None:
        assert not PLAN.prompt_flash  # torch's SDPA runs a prompt's attention here
        return
    g = torch.Generator().manual_seed(T + d + offset)
    # q as the model leaves it ([1, H, T, d] -> [T, H, d]: strided), k / v as gathered from the pool
    q = (torch.randn(H, T, d, generator=g) * 1.5).bfloat16().transpose(0, 1)
    k = (torch.randn(offset + T, Hkv, d, generator=g) * 1.5).bfloat16()
    v = torch.randn(offset + T, Hkv, d, generator=g).bfloat16()
    o = mod.bf16_causal_attention(q, k, v, offset, d ** -0.5)
    assert o.dtype == torch.bfloat16 and o.shape == (T, H * d) and o.is_contiguous()
    ref = causal_reference(q, k, v, offset)
    assert (o.float() - ref).abs().max() <= TOL * ref.abs().max()
    # the keys after a query's position do not reach it: query 0 keeps its bits whatever they hold
    k2, v2 = k.clone(), v.clone()
    k2[offset + 1:], v2[offset + 1:] = 1e4, -3e4
    assert torch.equal(mod.bf16_causal_attention(q, k2, v2, offset, d ** -0.5)[0], o[0])


def test_the_causal_kernel_refuses_bad_shapes_with_a_message():
    mod = kernels()
    if mod is None:
        assert not PLAN.prompt_flash
        return
    q, k = torch.zeros(4, 8, 64, dtype=torch.bfloat16), torch.zeros(6, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="offset \\+ T keys"):
        mod.bf16_causal_attention(q, k, k, 1, 0.1)
    with pytest.raises(RuntimeError, match="multiple of the key heads"):
        mod.bf16_causal_attention(torch.zeros(4, 6, 64, dtype=torch.bfloat16), torch.zeros(4, 4, 64, dtype=torch.bfloat16),
                                  torch.zeros(4, 4, 64, dtype=torch.bfloat16), 0, 0.1)
    with pytest.raises(RuntimeError, match="even and at most 256"):
        big = torch.zeros(4, 2, 258, dtype=torch.bfloat16)
        mod.bf16_causal_attention(big, big, big, 0, 0.1)
    with pytest.raises(RuntimeError, match="strides must be even"):
        odd = torch.zeros(4, 2, 7, dtype=torch.bfloat16)
        mod.bf16_causal_attention(odd, odd, odd, 0, 0.1)
    with pytest.raises(RuntimeError, match="bf16"):
        mod.bf16_causal_attention(q.float(), k.float(), k.float(), 2, 0.1)
    with pytest.raises(RuntimeError, match="one shape"):
        mod.bf16_causal_attention(q, k, k[:, :1], 2, 0.1)
    with pytest.raises(RuntimeError, match="q \\[T, H, d\\]"):
        mod.bf16_causal_attention(q[None], k, k, 2, 0.1)


def first_logits(model, ids, chunk):
    """The logits the engine samples the first token from (prompt fed in chunks of `chunk` tokens)."""
    seen = []
    params = SamplingParams(max_new_tokens=1, stop_token_ids=[],
                            logits_processors=[lambda out, logits: seen.append(logits.clone()) or logits])
    engine = Engine(model, max_context=4096, max_num_batched_tokens=chunk, idle_budget_factor=1)
    engine.add(Sequence(ids, params))
    while engine.has_work():
        engine.step()
    return seen[0]


@pytest.mark.parametrize("version,chunk", [("4.6", 512), ("4.6", 24), ("4.5", 24), ("4.0", 512)])
def test_a_prompt_runs_the_causal_kernel_within_tolerance_of_sdpa(tiny46_dir, version, chunk):
    """4.6's gated attention and 4.0 / 4.5's Llama-layout attention hand a 16-bit load's prompt to the
    kernel, one call per layer per chunk; prefill logits within the bf16 path's 3% of SDPA's."""
    from minicpmv.loading import load_model
    from test_golden_v40_v45 import version_dir

    model, _ = load_model(tiny46_dir if version == "4.6" else version_dir(version) / "model", "bfloat16", "cpu", progress=False)
    layers = [m for m in model.modules() if hasattr(m, "prompt_flash")]
    mod = layers[0].prompt_flash
    assert layers and all(m.prompt_flash is mod for m in layers)
    if mod is None:
        assert not PLAN.prompt_flash or kernels() is None
        return
    assert PLAN.prompt_flash
    calls = []

    class Spy:
        def bf16_causal_attention(self, q, k, v, offset, scale):
            calls.append((q.shape[0], offset))
            return mod.bf16_causal_attention(q, k, v, offset, scale)

    ids = [(13 * i + 7) % 3000 + 10 for i in range(60)]
    with torch.inference_mode():
        for m in layers:
            m.prompt_flash = None
        sdpa = first_logits(model, ids, chunk).float()
        for m in layers:
            m.prompt_flash = Spy()
        got = first_logits(model, ids, chunk).float()
    starts = [0] if chunk >= 60 else [0, 24, 48]
    assert sorted(set(calls), key=lambda c: c[1]) == [(min(chunk, 60 - s), s) for s in starts]  # each chunk after its context
    assert len(calls) == len(starts) * len(layers)
    assert (got - sdpa).abs().max() <= 0.03 * sdpa.abs().max()
