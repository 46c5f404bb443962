"""Round trip: a tiny random 4.6 checkpoint quantized by `minicpmv quantize` (our GPTQ) is a
valid GPTQ folder that transformers 5.23 + optimum + gptqmodel load on CPU with the same logits
as our loader (fp16 and bf16, within 1e-3) and the same greedy tokens; our load also equals a
float model built from our own dequantization of the written tensors. Two variants: the
released recipe's format (v1 "gptq", symmetric, no act-order) and gptq_v2 + asymmetric + act-order.

transformers/optimum/gptqmodel are test-only oracles; without gptqmodel those tests skip."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from minicpmv.engine.engine import Engine
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence
from minicpmv.families import adapter_for
from minicpmv.loading import load_model
from minicpmv.quant.gptq_format import GPTQSpec, dequantize_gptq
from minicpmv.cpu.isa import detect
from minicpmv.quant.gptq_linear import BF16_SCALES, FP32_SCALES, GPTQLinear
from minicpmv.quant.quantize_cli import engine_run_sample, quantize_folder, synthetic_images

VARIANTS = {"v1-sym": GPTQSpec(4, 32, True, False, "gptq"),
            "v2-asym-actorder": GPTQSpec(4, 32, False, True, "gptq_v2")}
N_TOKENS = 8


@pytest.fixture(scope="module", params=list(VARIANTS))
def quantized(request, tiny46_dir, tmp_path_factory):
    spec = VARIANTS[request.param]
    out = tmp_path_factory.mktemp(f"gptq-{request.param}")
    quantize_folder(tiny46_dir, out, spec, progress=False)
    return spec, out


def tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def prompts(folder):
    """(input_ids, vision) for a text chat and an image chat, through the real preprocessing."""
    config = json.loads((folder / "config.json").read_text())
    family = adapter_for(folder, config, Tokenizer.from_file(str(folder / "tokenizer.json")))
    text = family.prepare([{"role": "user", "content": "Write a haiku about quantized weights."}])
    image = family.prepare([{"role": "user", "content": [{"type": "image", "image": synthetic_images(2, seed=3)[1]},
                                                          "What is in the picture?"]}])
    return [(text.input_ids, text.vision), (image.input_ids, image.vision)]


def our_logits(model, ids, vision):
    hidden = engine_run_sample(model)({"input_ids": torch.tensor(ids), "vision": vision})
    return model.logits(hidden[0]).float()


def pure_dtype(model, dtype):
    """Every float parameter/buffer in `dtype` (compute in `dtype`, as transformers does), except
    the GPTQ layers' buffers, which keep their checkpoint dtypes."""
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            continue
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is not None and t.is_floating_point():
                    table[key] = torch.nn.Parameter(t.to(dtype), requires_grad=False) if table is module._parameters \
                        else t.to(dtype)
    model.tie_weights()
    return model


def our_greedy(model, ids, vision):
    engine = Engine(model, max_context=4096)
    seq = engine.add(Sequence(list(ids), SamplingParams(max_new_tokens=N_TOKENS, do_sample=False), vision))
    while engine.has_work():
        engine.step()
    return seq.output_ids


def test_folder_is_a_gptq_checkpoint(quantized, tiny46_dir):
    spec, out = quantized
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "gptq" and q["bits"] == 4 and q["group_size"] == 32
    assert q["sym"] == spec.sym and q["desc_act"] == spec.desc_act
    assert q["checkpoint_format"] == q["format"] == spec.format
    assert json.loads((out / "quantize_config.json").read_text()) == q
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "generation_config.json"):
        assert (out / name).read_bytes() == (tiny46_dir / name).read_bytes()
    src, dst = tensors(tiny46_dir), tensors(out)
    quantized_modules = sorted(k[:-len(".qweight")] for k in dst if k.endswith(".qweight"))
    assert len(quantized_modules) == 26
    assert all(m.startswith("model.language_model.layers.") for m in quantized_modules)
    for key, t in src.items():
        module = key.rsplit(".", 1)[0]
        if module in quantized_modules:
            assert key not in dst
        else:  # vision tower, merger, embeddings, norms, DeltaNet in_proj_a/b: copied bit for bit
            assert dst[key].dtype == t.dtype and torch.equal(dst[key], t), key
    for m in quantized_modules:
        assert dst[f"{m}.qweight"].dtype == torch.int32 and dst[f"{m}.scales"].dtype == torch.float16
        if spec.sym and spec.format == "gptq":
            assert bool((dst[f"{m}.qzeros"] == 0x77777777).all())
        if spec.desc_act:
            assert not torch.equal(dst[f"{m}.g_idx"], torch.arange(len(dst[f"{m}.g_idx"]), dtype=torch.int32) // 32)


def test_our_load_equals_own_dequantized_reference(quantized, tiny46_dir):
    spec, out = quantized
    ours, _ = load_model(out, "float32", "cpu", progress=False)
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, GPTQLinear)}
    assert len(layers) == 26 and all(m.backend == "fp16_weight" for m in layers.values())  # fp32: exact path
    int4 = copy.deepcopy(ours)  # this CPU's arithmetic (fp32-scales on AVX512-BF16, fp32 activations exact)
    avx2 = copy.deepcopy(ours)  # torch's int4 kernel with bf16 scales and bf16 activations (AVX2 CPUs)
    for m in int4.modules():
        if isinstance(m, GPTQLinear):
            m.prepare("auto")
    for m in avx2.modules():
        if isinstance(m, GPTQLinear):
            m.prepare("auto", isa="avx2")
    assert all(m.backend == "cpu_int4" for m in int4.modules() if isinstance(m, GPTQLinear))
    assert all(m._rt["math"] == BF16_SCALES for m in avx2.modules() if isinstance(m, GPTQLinear))
    here = {m._rt["math"] for m in int4.modules() if isinstance(m, GPTQLinear)}
    assert here == {FP32_SCALES if detect().at_least("avx512_bf16") else BF16_SCALES}
    # the reference: the dense model with each quantized weight replaced by our float dequantization
    ref, _ = load_model(tiny46_dir, "float32", "cpu", progress=False)
    dst = tensors(out)
    with torch.no_grad():
        for name in layers:
            p = f"model.{name}"
            w = dequantize_gptq(dst[f"{p}.qweight"], dst[f"{p}.qzeros"], dst[f"{p}.scales"], dst[f"{p}.g_idx"],
                                spec.bits, spec.format)
            ref.get_submodule(name).weight.copy_(w)
    ref16 = copy.deepcopy(ref)  # each weight rounded once to fp16, as gptqmodel dequantizes
    with torch.no_grad():
        for name in layers:
            w = ref16.get_submodule(name).weight
            w.copy_(w.half().float())
    dense_ours = copy.deepcopy(ours)
    for m in dense_ours.modules():
        if isinstance(m, GPTQLinear):
            m.prepare("dense")
    for ids, vision in prompts(out):
        r = our_logits(ref, ids, vision)
        torch.testing.assert_close(our_logits(dense_ours, ids, vision), r, rtol=0, atol=1e-4)
        # the fp32 path: fp16-rounded weights, fp32 math
        torch.testing.assert_close(our_logits(ours, ids, vision), our_logits(ref16, ids, vision), rtol=0, atol=1e-4)
        # bf16 scales and bf16 activations: each layer is ~0.25% off (relative); this tiny random model
        # amplifies that to 1.7-7.2% of the logits, depending on the checkpoint (docs/findings.md)
        k = our_logits(avx2, ids, vision)
        assert ((k - r).norm() / r.norm()).item() < 0.1
        # fp32 scales with fp32 activations: the exact weight, only fp32 summation order differs
        k = our_logits(int4, ids, vision)
        limit = 1e-4 if here == {FP32_SCALES} else 0.1
        assert ((k - r).norm() / r.norm()).item() < limit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_transformers_gptqmodel_loads_it_with_the_same_logits(quantized, dtype):
    """bf16/fp16: both sides run the same CPU int4 kernel, text prompts agree bit for bit. Image
    prompts are compared in fp32 only: the dense (unquantized) vision tower already differs from
    transformers by O(1) logits in bf16 on this tiny random model, which says nothing about GPTQ.
    In fp32 gptqmodel dequantizes each weight to fp16 (its scales' dtype) and multiplies in fp32, and
    so does our load with dtype float32 ("fp16_weight" backend); test_gptq_fp32_parity.py covers
    every checkpoint format that way."""
    import gptqmodel  # noqa: F401  (the oracles must be installed)
    import optimum  # noqa: F401
    from transformers import AutoModelForImageTextToText

    spec, out = quantized
    ref = AutoModelForImageTextToText.from_pretrained(out, dtype=dtype, device_map="cpu").eval()
    qtype = type(ref.model.language_model.layers[0].mlp.gate_proj).__name__
    dense_a = type(ref.model.language_model.layers[0].linear_attn.in_proj_a).__name__
    assert qtype != "Linear" and dense_a == "Linear"
    ours = pure_dtype(load_model(out, "float32", "cpu", progress=False)[0], dtype)
    if dtype != torch.float32:
        for m in ours.modules():
            if isinstance(m, GPTQLinear):  # half-precision activations: the int4 kernel, as gptqmodel
                m.prepare("auto")
    cases = prompts(out) if dtype == torch.float32 else prompts(out)[:1]
    for ids, vision in cases:
        kwargs = {"input_ids": torch.tensor([ids])}
        for v in vision:
            kwargs["pixel_values"], kwargs["target_sizes"] = v.pixel_values, v.target_sizes
        with torch.no_grad():
            theirs = ref(**kwargs).logits[0].float()
            tokens = ref.generate(**kwargs, max_new_tokens=N_TOKENS, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()
        mine = our_logits(ours, ids, vision)
        diff = (mine - theirs).abs().max().item()
        print(f"\n{spec.format} sym={spec.sym} desc_act={spec.desc_act} {dtype} vision={bool(vision)}: "
              f"transformers+gptqmodel ({qtype}; in_proj_a {dense_a}) max |logit diff| {diff:.2e} over "
              f"{len(ids)} positions (logit scale {theirs.abs().max().item():.1f})")
        assert diff <= 1e-3
        assert our_greedy(ours, ids, vision) == tokens


def test_cli_with_a_calibration_folder(tiny46_dir, tmp_path):
    from minicpmv.cli import main

    calib = tmp_path / "calib"
    calib.mkdir()
    img = synthetic_images(1, seed=9)[0]
    img.save(calib / "chart.png")
    (calib / "chart.txt").write_text("Read the labels in this picture.")
    (calib / "notes.txt").write_text("First paragraph about rivers and mills.\n\nSecond one: 2 + 2 = 4, and so on.")
    (calib / "chats.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]}) + "\n"
        + json.dumps({"text": "def f(x):\n    return x * 2"}) + "\n")
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(tiny46_dir), "--out", str(out), "--group-size", "32", "--bits", "8",
                 "--calibration", str(calib), "--quiet"]) == 0
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["bits"] == 8 and q["group_size"] == 32
    model, _ = load_model(out, "float32", "cpu", progress=False)
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    assert len(layers) == 26 and all(m.backend == "fp16_weight" for m in layers)  # float32: the exact path
    ids, vision = prompts(out)[1]
    assert torch.isfinite(our_logits(model, ids, vision)).all()
    for m in layers:
        m.prepare("auto")
    assert all(m.backend == "dequant" for m in layers)  # 8-bit otherwise: per-call dequantization
    assert torch.isfinite(our_logits(model, ids, vision)).all()


def test_minicpmv45_layout_quantizes_and_loads(tmp_path):
    """The 4.0/4.5 remote-code layout (`llm.model.layers.*`, Qwen3 for 4.5): the quantized keys are
    `llm.model.layers.N.{self_attn.q/k/v/o_proj, mlp.gate/up/down_proj}.{qweight,qzeros,scales,g_idx}`
    (spec v40_v45 §2.4), and our load equals the own-dequantization reference."""
    from paths import GOLDEN

    src = GOLDEN / "minicpm-v-4.5" / "model"
    assert src.is_dir(), f"the shared golden 4.5 checkpoint is missing: {src}"
    out = tmp_path / "v45"
    result = quantize_folder(src, out, GPTQSpec(4, 32, True, False, "gptq"), progress=False)
    assert all(r.gptq_error < r.rtn_error for r in result.reports)
    dst = tensors(out)
    names = sorted(k[:-len(".qweight")] for k in dst if k.endswith(".qweight"))
    assert names and all(n.startswith("llm.model.layers.") for n in names)
    assert {n.split(".", 4)[-1] for n in names} == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                   "mlp.down_proj"}
    ours, _ = load_model(out, "float32", "cpu", progress=False)
    ref, _ = load_model(src, "float32", "cpu", progress=False)
    with torch.no_grad():
        for n in names:
            ref.get_submodule(n).weight.copy_(dequantize_gptq(dst[f"{n}.qweight"], dst[f"{n}.qzeros"],
                                                              dst[f"{n}.scales"], dst[f"{n}.g_idx"], 4, "gptq"))
    for m in ours.modules():
        if isinstance(m, GPTQLinear):
            m.prepare("dense")
    ids = list(range(10, 40))
    torch.testing.assert_close(our_logits(ours, ids, []), our_logits(ref, ids, []), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_each_layer_equals_gptqmodels_on_this_cpu(quantized, dtype):
    """Layer by layer, bit for bit, at the row counts where gptqmodel's kernels change path (1 row, its
    4-row tiles up to 24 rows, its brgemm beyond): our "auto" kernel on this CPU against the layer
    transformers + gptqmodel built here (TorchCpuAvx512Linear on AVX512-BF16, TorchAtenLinear on AVX2)."""
    import gptqmodel  # noqa: F401
    from transformers import AutoModelForImageTextToText

    spec, out = quantized
    ref = AutoModelForImageTextToText.from_pretrained(out, dtype=dtype, device_map="cpu").eval()
    ours, _ = load_model(out, "float32", "cpu", progress=False)
    g = torch.Generator().manual_seed(5)
    checked = 0
    for name, layer in ours.named_modules():
        if not isinstance(layer, GPTQLinear):
            continue
        theirs = ref.get_submodule("model." + name)
        layer.prepare("auto")
        for rows in (1, 21, 40):
            x = torch.randn(rows, layer.in_features, generator=g).to(dtype)
            with torch.no_grad():
                expected, got = theirs(x), layer(x)
            assert got.dtype == expected.dtype == dtype
            assert torch.equal(got, expected), (name, rows, type(theirs).__name__, layer._rt["math"])
            checked += 1
    assert checked == 26 * 3
