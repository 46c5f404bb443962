"""Load-time weight-only int8 / int4 (layers/weight_formats.py, weights= in load_model): the
rounding each format promises, its kernels against its own dequantized matrix, one resident copy
of a tied lm_head/embedding, and the end-to-end accuracy against the exact fp32 load of the tiny
4.6 and 4.5 checkpoints (top-1 agreement over 256 greedy steps, max logit error).

The stated tolerances (measured 2026-12-01 on torch 2.14.1; tiny random models amplify any
perturbation chaotically over long generations, so the end-to-end figures are far worse than on
real weights; the per-matrix error bounds are the format's own promise):
  int8 per-channel:  |w - w_q| <= scale/2 per row; 4.6 top-1 >= 0.80, 4.5 top-1 >= 0.85
  int4 g64 asym:     per group, the squared error of the best of 4 clipped min/max grids (never
                     worse than plain min/max, whose error is <= scale/2); 4.6 top-1 >= 0.10,
                     4.5 top-1 >= 0.25, first-step max logit error <= 50% of the logit scale
  (measured over 256 steps: int8 0.863 / 0.887, first step 2.9% / 4.2%; int4 0.137 / 0.387,
  first step 41% / 36%, the untied 4.5 embedding stored int8 under both, the 24-token prompt
  through the kernels on AVX-512; docs/performance.md has the table)"""
import platform

import pytest
import torch

from format_accuracy import accuracy, first_step_error
from minicpmv.cpu.apply import format_bytes
from minicpmv.layers.weight_formats import (INT4_ROW_BLOCK, Int4Linear, Int8Linear, TiedEmbedding,
                                            int4_codes, int4_grid, int4_layout_ok, int4_pack)
from minicpmv.loading import load_model
from quant_reference import prompts_round
from test_golden_v40_v45 import version_dir
from tiny46 import build_tiny_46

STEPS = 256
# format -> (min top-1 agreement on tiny 4.6, on tiny 4.5, max first-step logit error relative to the logit scale)
TOLERANCE = {"int8": (0.80, 0.85, 0.05), "int4": (0.10, 0.25, 0.5)}
# int8 where prompts run the kernel that rounds activations to int8 per 32 inputs (the AVX2 plan;
# quant_reference.prompts_round): the first step (the prompt's logits) measured 0.065 against 0.035
# with exact prompt products on tiny 4.6, 0.041 against 0.046 on tiny 4.5; top-1 0.852 / 0.895
# against 0.859 / 0.898 (2026-12-04, Zen 3)
ROUNDED_PROMPT_FIRST_MAX = {"int8": 0.08, "int4": 0.5}


def weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3] = 0.0                     # an all-zero row must not divide by zero
    w[5, 7] = 4.0                  # an outlier widens its row's (int8) / group's (int4) grid only
    return w.bfloat16()


def test_int8_rounds_each_row_to_half_a_step_and_its_kernels_agree():
    w = weight(200, 128)
    lin = Int8Linear(w, torch.randn(200))
    deq = lin.dequantize(0, 200).clone()
    step = lin.scale.float()[:, None]
    assert lin.qweight.dtype == torch.int8 and int(lin.qweight.abs().max()) <= 127
    assert bool(((deq - w.float()).abs() <= step / 2 + 1e-7).all())
    assert bool((deq[3] == 0).all())
    assert (deq - w.float()).abs()[6].max() < 0.05 * 0.05  # rows without the outlier keep a fine grid
    for rows in (1, 3, 40):  # kernel (bf16 activations) and dequantize + GEMM
        x = torch.randn(rows, 128)
        ref = x @ deq.t() + lin.bias
        assert (lin(x) - ref).abs().max() < 1e-2 * ref.abs().max()
    assert lin(torch.randn(2, 3, 128)).shape == (2, 3, 200)


def test_int4_grid_rounds_to_half_a_step_and_clipping_only_lowers_the_error():
    g = weight(64, 128).float().view(64, 2, 64)
    q, s, z = int4_grid(g, ranges=(1.0,))  # the plain min/max grid: every value within half a step
    deq = (q.float() - 8) * s.float()[..., None] + z.float()[..., None]
    assert int(q.max()) <= 15 and bool(((deq - g).abs() <= s.float()[..., None] / 2 + 1e-6).all())
    plain_sse = (deq - g).pow(2).sum(-1)
    q, s, z = int4_grid(g)  # searched: per group never worse than the plain grid
    searched_sse = ((q.float() - 8) * s.float()[..., None] + z.float()[..., None] - g).pow(2).sum(-1)
    assert bool((searched_sse <= plain_sse).all()) and searched_sse.sum() < plain_sse.sum()


def test_int4_linear_stores_the_grid_and_its_kernels_agree():
    # torch's int4 kernel reads our packing where torch runs at AVX-512 (it packs blocks of 64 rows
    # there); on AVX2 it packs blocks of 32 and its kernel is kept off our matrices
    if platform.machine() in ("x86_64", "AMD64"):
        assert int4_layout_ok() == (torch.backends.cpu.get_cpu_capability() == "AVX512")
    codes = torch.randint(0, 16, (128, 96), dtype=torch.uint8)
    assert torch.equal(int4_codes(int4_pack(codes), 96, 0, 128), codes)  # the layout reads back
    assert torch.equal(int4_codes(int4_pack(codes), 96, 37, 101), codes[37:101])
    w = weight(200, 128)  # 200 rows: padded to 256 for the kernel, the padding never returned
    lin = Int4Linear(w, None, group=64)
    assert lin.qweight.shape == (256, 64) and lin.qweight.dtype == torch.uint8
    q, s, z = int4_grid(w.float().view(200, 2, 64))
    assert torch.equal(lin.codes(0, 200), q.view(200, 128))
    deq = lin.dequantize(0, 200)
    torch.testing.assert_close(deq, ((q.float() - 8) * s.float()[..., None] + z.float()[..., None]).view(200, 128))
    assert (deq - w.float()).abs()[5, 64:].max() < 0.05  # the outlier's other group keeps its grid
    ids = torch.tensor([0, 5, 63, 64, 127, 199])
    torch.testing.assert_close(lin.embedding(ids), deq[ids])
    for rows in (1, 3, 40):
        x = torch.randn(rows, 128)
        ref = x @ deq.t()
        assert lin(x).shape == (rows, 200)
        assert (lin(x) - ref).abs().max() < 1e-2 * ref.abs().max()
    with pytest.raises(ValueError, match="group"):
        Int4Linear(w, None, group=48)


@pytest.fixture(scope="module")
def tiny46(tmp_path_factory):
    return build_tiny_46(tmp_path_factory.mktemp("tiny46-formats"), seed=1, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def references(tiny46):
    """fp32 models and prompts, shared by the accuracy cases."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, folder, vocab in (("4.6", tiny46, 248000), ("4.5", version_dir("4.5") / "model", 1040)):
        ref, _ = load_model(folder, "float32", "cpu", progress=False)
        out[name] = (folder, ref, torch.randint(10, vocab - 10, (24,), generator=g).tolist())
    return out


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_tied_head_and_embedding_keep_one_quantized_copy(tiny46, fmt):
    model, _ = load_model(tiny46, "auto", "cpu", progress=False, weights=fmt)
    head, embed = model.lm_head, model.language_model.embed_tokens
    assert isinstance(head, Int8Linear if fmt == "int8" else Int4Linear)
    assert isinstance(embed, TiedEmbedding)
    vocab, dim = head.out_features, head.in_features
    floating = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.is_floating_point() and t.shape[0] >= vocab]
    assert floating == [] or all("scale" in n for n in floating), floating
    ids = torch.tensor([1, 7, vocab - 1])
    torch.testing.assert_close(embed(ids), head.dequantize(0, vocab)[ids].float())
    layer = model.language_model.layers[0]
    assert type(layer.mlp.gate_up_proj) is type(head) and layer.mlp.gate_proj is None
    assert type(layer.linear_attn.in_proj) is type(head)
    sixteen, _ = load_model(tiny46, "auto", "cpu", progress=False, isa="avx2")
    prefixes = model.per_token_prefixes
    assert format_bytes(model, prefixes) < (0.6 if fmt == "int8" else 0.35) * format_bytes(sixteen, prefixes)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("version", ["4.6", "4.5"])
def test_accuracy_against_fp32(references, version, fmt):
    folder, ref, prompt = references[version]
    model, _ = load_model(folder, "auto", "cpu", progress=False, weights=fmt)
    acc = accuracy(ref, model, prompt, STEPS)
    first = first_step_error(ref, model, prompt)
    print(f"{version} {fmt}: {acc}; first-step max |logit error| / logit scale {first:.3g}")
    min_46, min_45, first_max = TOLERANCE[fmt]
    if prompts_round(model, fmt):
        first_max = ROUNDED_PROMPT_FIRST_MAX[fmt]
    assert acc.top1_agreement >= (min_46 if version == "4.6" else min_45)
    assert first <= first_max


def test_bad_weight_requests_fail_clearly(tiny46):
    with pytest.raises(ValueError, match="weights must be"):
        load_model(tiny46, "auto", "cpu", progress=False, weights="int3")
    with pytest.raises(ValueError, match="exact fp32"):
        load_model(tiny46, "float32", "cpu", progress=False, weights="int8")


def test_int4_pads_rows_to_the_kernel_block():
    w = torch.randn(16, 64)
    lin = Int4Linear(w, None, group=32)
    assert lin.qweight.shape[0] == INT4_ROW_BLOCK  # 16 rows stored as one block of 64
    x = torch.randn(1, 64)
    y = lin(x)
    assert y.shape == (1, 16)
    assert (y - x @ lin.dequantize(0, 16).t()).abs().max() < 1e-2 * y.abs().max()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_batched_decode_gives_the_tokens_of_decoding_alone(tiny46, fmt):
    """The quantized kernels are row-independent: sequences decoded together (several rows per
    GEMV) get exactly the tokens each gets alone, with one call per prompt chunk (mixed_steps=False:
    a mixed step puts chunk and decode rows in one product, whose kernel changes with the row count)."""
    from test_parity46_cpu_fast import greedy

    model, _ = load_model(tiny46, "auto", "cpu", progress=False, weights=fmt)
    g = torch.Generator().manual_seed(3)
    prompts = [(torch.randint(10, 240000, (n,), generator=g).tolist(), []) for n in (12, 20, 7)]
    assert greedy(model, prompts, mixed_steps=False) == [greedy(model, [p])[0] for p in prompts]


def test_on_a_gptq_checkpoint_the_dense_per_token_matrices_take_the_format(tiny46_dir, tmp_path):
    """A GPTQ checkpoint keeps the lm_head (and DeltaNet's a/b projections) dense: weights="int8"
    quantizes those at load, the GPTQ layers keep their codes (in the plan's int4 format where the
    AVX-512 extension or the AVX2 module runs, tests/test_gptq_int4.py). First-step logits within 8% of the GPTQ model's own
    (measured 5.1%)."""
    from minicpmv.cpu.plan import choose
    from minicpmv.quant.gptq_format import GPTQSpec
    from minicpmv.quant.gptq_int4 import GPTQInt4Linear
    from minicpmv.quant.gptq_linear import GPTQLinear
    from minicpmv.quant.quantize_cli import quantize_folder
    from test_parity46 import our_prefill_logits

    quantize_folder(tiny46_dir, tmp_path, GPTQSpec(4, 32, True, False, "gptq"), progress=False)
    base, _ = load_model(tmp_path, "auto", "cpu", progress=False)
    model, _ = load_model(tmp_path, "auto", "cpu", progress=False, weights="int8")
    layer = model.language_model.layers[0]
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.language_model.embed_tokens, TiedEmbedding)
    plan = choose()
    gptq = GPTQInt4Linear if plan.native_kernels or plan.avx2_gemv else GPTQLinear
    assert isinstance(layer.mlp.down_proj, gptq) and isinstance(layer.linear_attn.in_proj_a, Int8Linear)
    ids = list(range(100, 130))
    with torch.inference_mode():
        a, b = our_prefill_logits(base, ids, []), our_prefill_logits(model, ids, [])
    assert ((a - b).abs().max() / a.abs().max()).item() < 0.08
