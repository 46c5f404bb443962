"""A decode step's Qwen3.5 layers (DeltaNet and gated attention, each with its MLP) in one extension
call each (layers/fused_decode.py, cpu/csrc/decode_layers.cpp), against the same model running its
modules one by one:

  * each matrix handle multiplies exactly as its module does (bit for bit: same kernel, same bytes),
    bf16 (FMA rows and AMX tiles), int8, int4, and GPTQ int4 with an act-order permutation; projections
    a checkpoint keeps apart (GPTQ) side by side as the fused one;
  * a GPTQ checkpoint's layers run fused too: same tokens, logits within 5e-2 (measured 1.7e-2: the
    first two steps agree bit for bit, then an ulp of another order of operations moves one
    activation across an int8 rounding step of the int4 kernel, and the recurrent state carries it);
  * whole model, 24 greedy steps of the tiny 4.6: the same tokens, logits within 1e-5 of the logit
    scale for bf16 and int8 (measured 4-8e-7: sigmoid, softplus and silu in another order of
    operations) and 5e-2 for int4 (its kernel rounds the activations to int8 per 32 inputs as the
    int8 kernel does, and those ulps can move a rounding step, which the tiny random model
    amplifies: measured 1.3e-6, and 7.7e-3 since the prompt's q/k norms take the decode step's
    arithmetic: at one step the hidden state is 1.5e-2 off, 5e-7 at the next; the bound of the
    GPTQ check above, whose int4 kernel rounds the same way); the median step within 1e-5 for all
    three (measured 0, 1.3e-7, 4.5e-7);
  * a batch of sequences in non-consecutive pool slots, and of different lengths (the attention
    layers' rows per sequence), decodes to the same tokens; on the bf16_dot plan a batch of 12
    (past 8 rows) runs fused and decodes what each sequence decodes alone;
  * whatever does not qualify (a prompt, a CPU without the extension) takes the modules' path.
"""
import pytest
import torch
from torch import nn

from format_accuracy import forced_logits, greedy
from minicpmv.cpu import native
from minicpmv.cpu.isa import detect
from minicpmv.cpu.plan import BF16
from minicpmv.engine.engine import Engine
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence
from minicpmv.layers import fp16_packed, fused_decode
from minicpmv.layers.fp16_packed import PackedFP16Linear
from minicpmv.layers.weight_formats import Bf16Linear, Int4Linear, Int8Linear
from minicpmv.loading import load_model
from minicpmv.quant.gptq_int4 import int4_form
from test_gptq_int4 import gptq46, gptq_layer  # noqa: F401 (gptq46: a fixture)
from tiny46 import build_tiny_46

USABLE = native.unusable(detect()) is None  # the AVX-512 extension (bf16 rows too)
AVX2 = native.avx2_unusable(detect()) is None
FUSES = USABLE or AVX2  # a module holding the fused layers is built here (the plan's few_row_kernels)
PROMPT = [5, 17, 99, 3, 41, 8]


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return build_tiny_46(tmp_path_factory.mktemp("fused-bf16"), seed=1, dtype=torch.bfloat16)


class Spy:
    """Counts the layers that ran fused (and with how many rows); `off` makes every layer decline."""

    def __init__(self, monkeypatch):
        self.rows, self.attention, self.off = [], 0, False
        real, real_attn = fused_decode.layer_step, fused_decode._attn_layer

        def step(layer, x, *rest):
            y = None if self.off else real(layer, x, *rest)
            if y is not None:
                self.rows.append(x.shape[0])
            return y

        def attn(*args):
            y = real_attn(*args)
            self.attention += y is not None
            return y
        monkeypatch.setattr(fused_decode, "layer_step", step)
        monkeypatch.setattr(fused_decode, "_attn_layer", attn)


def sixteen_fuses(m) -> bool:
    """A 16-bit matrix a fused layer multiplies: fbgemm's fp16-packed one, or bf16 on the extension."""
    return type(m) is PackedFP16Linear or (type(m) is Bf16Linear and m.native is not None)


def fused_against_modules(model, spy, tokens: list[int]) -> torch.Tensor:
    """Each step's max logit error of the fused decode against the modules over the same tokens
    (relative to the modules' logit scale); also checks the modules decode the same tokens."""
    fused = forced_logits(model, PROMPT, tokens)
    spy.off = True
    modules = forced_logits(model, PROMPT, tokens)
    assert greedy(model, PROMPT, len(tokens)) == tokens
    return (fused - modules).abs().amax(-1) / modules.abs().max()


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_each_matrix_handle_multiplies_as_its_module(isa):
    """Bit for bit, each module's handle multiplies as the matrix's module does: bf16 (AVX-512 only),
    int8, int4, GPTQ int4 with act order, and fbgemm's fp16-packed matrix (one block or several,
    bias inside) through either module."""
    kernels = native.quant_kernels(detect()) if isa == "avx512" else native.avx2_kernels(detect())
    if kernels is None:
        assert not (USABLE if isa == "avx512" else AVX2)
        return
    g = torch.Generator().manual_seed(0)
    w = torch.randn(160, 256, generator=g)
    int8, int4 = Int8Linear(w, None), Int4Linear(w, None, group=64)
    gptq = int4_form(gptq_layer(False, True, 64, n=192, k=512))
    gptq.bias = None
    assert gptq.perm is not None
    for m in (int8, int4, gptq):
        m.native, m.native_rows = kernels, native.ROWS
    cases = [(int8, 1), (int8, 8), (int4, 2), (gptq, 1), (gptq, 5)]
    if isa == "avx512":
        bf16 = Bf16Linear.of(w.bfloat16(), None)
        bf16.native = kernels
        amx = Bf16Linear.of(w.bfloat16(), None)
        amx.native, amx.amx_rows = kernels, (5 if kernels.amx_rows_ok() else 0)
        cases += [(bf16, 1), (bf16, 3), (amx, 6)]
    else:
        with pytest.raises(RuntimeError, match="AVX-512 extension only"):
            kernels.Lin(0, w.bfloat16(), None, 0, 160, 0, None)
    if fp16_packed.available():
        fp16 = PackedFP16Linear(w.bfloat16(), torch.randn(160, generator=g))
        cases += [(fp16, 1), (fp16, 3)]
        blocks = fp16_packed.STAGING_BYTES
        try:  # the lm_head's form: packed in row blocks
            fp16_packed.STAGING_BYTES = 4 * 256 * 64
            split = PackedFP16Linear(w.bfloat16(), None)
        finally:
            fp16_packed.STAGING_BYTES = blocks
        assert split.block_rows == [64, 64, 32]
        cases.append((split, 2))
    for m, rows in cases:
        x = torch.randn(rows, m.in_features, generator=g)
        handle = fused_decode.native_matrix(m, rows, kernels)
        assert handle is not None, (type(m).__name__, rows)
        assert torch.equal(handle(x)[:, :m.out_features], m(x)), (type(m).__name__, rows)
    assert fused_decode.native_matrix(int4, native.ROWS + 1) is None  # more rows: the module's GEMM path
    int8.native = None
    assert fused_decode.native_matrix(int8, 1) is None


@pytest.mark.parametrize("case,tol", [("bf16", 1e-5), ("int8", 1e-5), ("int4", 5e-2)])
def test_fused_layers_decode_like_the_modules(case, tol, tiny46_dir, bf16_dir, monkeypatch):
    if case == "bf16":
        model, _ = load_model(bf16_dir, "auto", "cpu", progress=False)
    else:
        model, _ = load_model(tiny46_dir, "auto", "cpu", progress=False, weights=case)
    spy = Spy(monkeypatch)
    tokens = greedy(model, PROMPT, 24)
    layers = len(model.language_model.layers)
    if not FUSES:
        assert not spy.rows
        return
    if case == "bf16" and not any(sixteen_fuses(m) for m in model.language_model.modules()):
        assert not spy.rows  # this CPU's plan keeps a 16-bit kernel the modules do not multiply
        return
    assert len(spy.rows) == 23 * layers  # every decode step (the prompt is not one), every layer
    attention = sum(layer.layer_type == "full_attention" for layer in model.language_model.layers)
    assert spy.attention == 23 * attention  # attention layers whole too, not only their MLPs
    errors = fused_against_modules(model, spy, tokens)
    print(f"{case}: fused vs modules, logit error of the logit scale: max {errors.max():.2e}, "
          f"median step {errors.median():.2e}")
    assert errors.max() <= tol and errors.median() <= 1e-5  # a moved rounding step: a few steps, not most


def test_a_layers_decode_call_follows_its_weights(tiny46_dir, monkeypatch):
    """Each layer's decode call reads its modules once (fused_decode.LayerCall); a norm weight written
    in place, a parameter or a matrix replaced, or a kernel switched off by hand (then
    `invalidate()`), each after decoding, is what the next decode runs: fused logits within 1e-5 of
    the modules' on the changed model, and the change moved them."""
    if not FUSES:
        return
    model, _ = load_model(tiny46_dir, "auto", "cpu", progress=False, weights="int8")
    spy = Spy(monkeypatch)
    layers = model.language_model.layers
    tokens = greedy(model, PROMPT, 8)
    before = forced_logits(model, PROMPT, tokens)

    def changed():
        spy.off = False
        now = forced_logits(model, PROMPT, tokens)
        spy.off = True
        modules = forced_logits(model, PROMPT, tokens)
        assert ((now - modules).abs().max() / modules.abs().max()).item() <= 1e-5
        assert not torch.allclose(now, before)
        return now

    with torch.no_grad():
        layers[0].input_layernorm.weight.add_(0.5)  # in place: its derived scale (1 + w) follows
    before = changed()
    norm = layers[1].post_attention_layernorm
    norm.weight = nn.Parameter(norm.weight.detach() + 0.5, requires_grad=False)  # replaced
    before = changed()
    old = layers[2].mlp.down_proj
    new = Int8Linear(torch.randn(old.out_features, old.in_features) * 0.05, None)
    new.native, new.native_rows = old.native, old.native_rows
    layers[2].mlp.down_proj = new  # a matrix replaced
    before = changed()
    spy.off, spy.rows = False, []
    layers[0].mlp.native = None  # a plain attribute set by hand
    fused_decode.invalidate()
    greedy(model, PROMPT, 3)
    assert len(spy.rows) == 2 * (len(layers) - 1)  # layer 0 now runs its modules


def test_an_attention_layer_that_does_not_qualify_keeps_its_mlp_in_one_call(tiny46_dir, monkeypatch):
    """Attention through its modules (as with a 16-bit KV pool), its MLP still one call: same tokens,
    logits within 1e-5 (int8)."""
    model, _ = load_model(tiny46_dir, "auto", "cpu", progress=False, weights="int8")
    spy = Spy(monkeypatch)
    monkeypatch.setattr(fused_decode, "_attn_layer", lambda *args: None)
    tokens = greedy(model, PROMPT, 12)
    if not FUSES:
        assert not spy.rows
        return
    assert len(spy.rows) == 11 * len(model.language_model.layers)
    assert fused_against_modules(model, spy, tokens).max() <= 1e-5


def test_projections_kept_apart_multiply_side_by_side(tiny46_dir):
    model, _ = load_model(tiny46_dir, "auto", "cpu", progress=False, weights="int8")
    mlp = model.language_model.layers[0].mlp
    if mlp.native is None:
        assert fused_decode.native_projection(mlp, "gate_up_proj", 1) is None
        return
    fused = mlp.gate_up_proj
    I = fused.out_features // 2
    gate, up = Int8Linear(torch.randn(I, fused.in_features), None), Int8Linear(torch.randn(I, fused.in_features), None)
    for m in (gate, up):
        m.native, m.native_rows = mlp.native, native.ROWS
    mlp.gate_proj, mlp.up_proj, mlp.gate_up_proj = gate, up, None
    x = torch.randn(3, fused.in_features)
    handle = fused_decode.native_projection(mlp, "gate_up_proj", 3)
    assert torch.equal(handle(x), torch.cat([gate(x), up(x)], dim=-1))
    assert fused_decode.native_projection(mlp, "gate_up_proj", 3) is handle  # cached while the members stay
    mlp.up_proj = None
    assert fused_decode.native_projection(mlp, "gate_up_proj", 3) is None


def test_a_gptq_checkpoint_decodes_fused(gptq46, monkeypatch):
    model, _ = load_model(gptq46, "bfloat16", "cpu", progress=False)  # 16 bits: the int4 move (quant/gptq_int4.py)
    spy = Spy(monkeypatch)
    tokens = greedy(model, PROMPT, 16)
    if not spy.rows:  # no module is built here: GPTQ keeps its own kernels
        assert not FUSES
        return
    # a layer fuses when every matrix in it is one the extension multiplies: the GPTQ layers (moved
    # to int4) and the 16-bit ones the checkpoint kept, where the plan stores them bf16
    layers = model.language_model.layers
    fusable = [all(not isinstance(m, (nn.Linear, PackedFP16Linear))
                   or fused_decode.native_matrix(m, 1, layer.mlp.native) is not None
                   for m in layer.modules()) for layer in layers]
    assert sum(fusable) > 0 and (all(fusable) or model.kernel_plan.text16 != BF16)
    assert len(spy.rows) == 15 * sum(fusable)
    err = fused_against_modules(model, spy, tokens).max().item()
    print(f"GPTQ: fused vs modules, max logit error {err:.2e} of the logit scale")
    assert err <= 5e-2


def decode_batch(model, spy_off: bool, spy) -> list[list[int]]:
    """Three sequences; the second stops early, so the other two decode in slots 0 and 2."""
    spy.off = spy_off
    engine = Engine(model, max_context=512)
    seqs = [engine.add(Sequence(PROMPT[i:] + [7 * i + 1], SamplingParams(max_new_tokens=n, do_sample=False), []))
            for i, n in enumerate((14, 3, 14))]
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


@pytest.mark.parametrize("weights", [None, "int4"])
def test_a_batch_in_scattered_slots_decodes_like_the_modules(weights, bf16_dir, monkeypatch):
    model, _ = load_model(bf16_dir, "auto", "cpu", progress=False, **({"weights": weights} if weights else {}))
    spy = Spy(monkeypatch)
    fused = decode_batch(model, False, spy)
    if FUSES and (weights or any(sixteen_fuses(m) for m in model.modules())):
        assert {2, 3} <= set(spy.rows)
    assert decode_batch(model, True, spy) == fused


def test_a_batch_past_8_rows_decodes_fused_within_the_plans_vdpbf16ps_rows(bf16_dir, monkeypatch):
    """On the bf16_dot plan (AVX512-BF16 without AMX) a decode batch of 12 sequences, past the 8 rows
    of the FMA kernel and within the plan's bf16_dot_rows, runs the fused layers, and each sequence
    decodes the tokens it decodes alone: the vdpbf16ps rows sum each row alike whatever shares the
    call, and with one model call per prompt chunk its prompt is computed alike too. (Against the
    modules one by one only a tolerance holds at 12 rows: there the MLP takes its prompt path, whose
    gate/up products are rounded to bf16 before silu.)"""
    model, _ = load_model(bf16_dir, "auto", "cpu", progress=False)
    spy = Spy(monkeypatch)
    prompts = [PROMPT + [i + 1, 3 * i + 2, 5] for i in range(12)]  # 9 tokens: the MLP's prompt path alone too

    def run(batch: list[list[int]]) -> list[list[int]]:
        spy.rows = []
        engine = Engine(model, max_context=512, mixed_steps=False)
        seqs = [engine.add(Sequence(p, SamplingParams(max_new_tokens=6, do_sample=False), [])) for p in batch]
        while engine.has_work():
            engine.step()
        return [s.output_ids for s in seqs]

    together = run(prompts)
    plan = model.kernel_plan
    if USABLE and plan.bf16_dot and any(type(m) is Bf16Linear and m.bf16_dot for m in model.modules()):
        assert plan.bf16_dot_rows >= 12 and 12 in spy.rows
    assert all(len(t) == 6 for t in together)
    alone = [run([p])[0] for p in prompts]
    if plan.amx_rows and not plan.bf16_dot:
        # AMX machines: 5-16 decode rows go through the tiles with the activations rounded to bf16, one
        # row through the exact FMA rows, so only the prompt's token is computed alike whatever the batch
        assert [a[0] for a in alone] == [t[0] for t in together]
    else:
        assert alone == together


def test_a_prompt_and_bad_state_take_no_fused_path(tiny46_dir):
    model, _ = load_model(tiny46_dir, "auto", "cpu", progress=False, weights="int8")
    layer = model.language_model.layers[0]
    assert layer.layer_type == "linear_attention"
    x = torch.randn(1, 2, layer.mlp.down_proj.out_features)
    assert fused_decode.layer_step(layer, x, object(), 0, None) is None  # two tokens: a prompt chunk
    kernels = layer.mlp.native
    if kernels is None:
        return
    mixer = layer.linear_attn
    lin = fused_decode.native_matrix(mixer.in_proj, 1)
    conv = torch.zeros(2, mixer.conv_dim, mixer.kernel - 1)
    rec = torch.zeros(2, mixer.num_v_heads, mixer.k_dim, mixer.v_dim)
    D = x.shape[-1]
    args = [torch.randn(1, D), torch.ones(D), torch.ones(D), 1e-6, lin, fused_decode.native_matrix(mixer.out_proj, 1),
            fused_decode.native_matrix(layer.mlp.gate_up_proj, 1), fused_decode.native_matrix(layer.mlp.down_proj, 1),
            conv, mixer.conv1d.weight.reshape(mixer.conv_dim, -1).contiguous(), rec, [5],
            torch.zeros(mixer.num_v_heads), torch.zeros(mixer.num_v_heads), torch.ones(mixer.v_dim), 1e-6,
            mixer.num_k_heads, 0.25, 1e-6]
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernels.delta_layer(*args)
    args[11] = [0, 1]
    with pytest.raises(RuntimeError, match="one slot per row"):
        kernels.delta_layer(*args)
    attn_layer = model.language_model.layers[1]
    assert attn_layer.layer_type == "full_attention"
    attn, mlp = attn_layer.self_attn, attn_layer.mlp
    hd, Hkv = attn.head_dim, attn.num_kv_heads
    keys, values = torch.zeros(4, Hkv, hd), torch.zeros(4, Hkv, hd)
    R = 8
    args = [torch.randn(1, D), torch.ones(D), torch.ones(D), 1e-6,
            fused_decode.native_matrix(attn.qkv_proj, 1), fused_decode.native_matrix(attn.o_proj, 1),
            fused_decode.native_matrix(mlp.gate_up_proj, 1), fused_decode.native_matrix(mlp.down_proj, 1),
            torch.ones(hd), torch.ones(hd), 1e-6, torch.ones(1, R), torch.zeros(1, R), keys, values,
            torch.tensor([4]), torch.tensor([[0, 1]]), [2], attn.num_heads, hd ** -0.5]
    with pytest.raises(RuntimeError, match="outside the KV pool"):
        kernels.attn_layer(*args)
    args[15], args[16] = torch.tensor([1]), torch.tensor([[0, 9]])
    with pytest.raises(RuntimeError, match="outside the KV pool"):
        kernels.attn_layer(*args)
    args[16] = torch.tensor([[0, 1]])
    assert kernels.attn_layer(*args).isfinite().all()  # the same call with rows inside the pool
