"""The kernels "auto" picks on CPUs with bf16 units (cpu/plan.py): bf16 GEMMs with fp32
accumulation for the vision tower and merger, and on AMX for the text matrices too. Activations
are rounded to bf16 at each matrix product, so this is not the exact fp32 path; its stated
tolerances against the fp32 load of the same checkpoint (measured 2026-12-01, torch 2.14.1):
  vision embeddings (4.6 image, 4.5 golden sliced image): max |error| <= 3% of their max |value|
  prefill logits with an image: max |error| <= 3% of the max |logit|
  (vision attention runs in bf16 too, and the MLPs keep their hidden activations bf16)
  text matrices in bf16 too (the AMX plan): top-1 agreement >= 0.93 (4.6) / 0.95 (4.5) over 256
  greedy steps (measured 0.953 / 0.969); vision measured 0.7% / 0.3%, prefill logits 1.6% / 0.65%
The plan is forced here so every CPU runs these paths (on one without bf16 units they are slow,
not wrong)."""
import pytest
import torch

from format_accuracy import accuracy
from minicpmv import loading
from minicpmv.cpu.isa import detect
from minicpmv.cpu.plan import BF16, FP16_PACKED, KernelPlan
from minicpmv.layers.fp16_packed import PackedFP16Linear
from minicpmv.layers.mixed import MixedEmbedding
from minicpmv.layers.weight_formats import Bf16Linear
from minicpmv.loading import load_model
from test_golden_v40_v45 import case_of, version_dir
from test_parity46 import our_vision, picture, ref_inputs
from tiny46 import build_tiny_46

VISION_TOL, LOGIT_TOL = 0.03, 0.03
TOP1 = {"4.6": 0.93, "4.5": 0.95}


def forced(text16):
    plan = KernelPlan(detect(), vision_bf16=True, text16=text16, gemm_dtype=torch.bfloat16, source="test")
    return lambda isa=None: plan


def load(folder, monkeypatch, text16=BF16, dtype="auto"):
    monkeypatch.setattr(loading, "choose", forced(text16))
    model, _ = load_model(folder, dtype, "cpu", progress=False)
    monkeypatch.undo()
    return model


@pytest.fixture(scope="module")
def tiny46(tmp_path_factory):
    return build_tiny_46(tmp_path_factory.mktemp("tiny46-bf16path"), seed=1, dtype=torch.bfloat16)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_modules_and_one_copy_of_the_tied_matrix(tiny46, monkeypatch):
    model = load(tiny46, monkeypatch)
    assert type(model.vision_tower.encoder.layers[0].mlp.fc1) is Bf16Linear
    for attn in (model.vision_tower.encoder.layers[0].self_attn, model.vision_tower.vit_merger.self_attn):
        # q/k/v one bf16 matrix, attention itself in bf16
        assert type(attn.qkv_proj) is Bf16Linear and attn.q_proj is None and attn.sdpa_dtype == torch.bfloat16
    layer = model.language_model.layers[0]
    assert type(layer.mlp.gate_up_proj) is Bf16Linear and layer.mlp.gate_proj is None
    assert type(layer.linear_attn.in_proj) is Bf16Linear
    assert type(model.lm_head) is Bf16Linear and isinstance(model.language_model.embed_tokens, MixedEmbedding)
    assert model.lm_head.weight.data_ptr() == model.language_model.embed_tokens.weight.data_ptr()
    mixed = load(tiny46, monkeypatch, text16=FP16_PACKED)  # AVX512-BF16 without AMX: bf16 vision only
    assert type(mixed.vision_tower.encoder.layers[0].mlp.fc1) is Bf16Linear
    assert isinstance(mixed.lm_head, PackedFP16Linear)


def test_46_image_prompt_within_tolerance(tiny46, monkeypatch):
    from transformers import AutoProcessor

    from test_parity46 import our_prefill_logits

    processor = AutoProcessor.from_pretrained(tiny46)
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    inputs = ref_inputs(processor, image, images=[[picture(390, 1130, 1)]])
    ids, vision = inputs["input_ids"][0].tolist(), our_vision(inputs, "16x")
    exact, _ = load_model(tiny46, "float32", "cpu", progress=False)
    fast = load(tiny46, monkeypatch)
    with torch.inference_mode():
        v = vision[0]
        feats = (exact.encode_vision(v.pixel_values, v.target_sizes), fast.encode_vision(v.pixel_values, v.target_sizes))
        logits = (our_prefill_logits(exact, ids, vision), our_prefill_logits(fast, ids, vision))
    print(f"4.6 bf16 path: vision {rel(feats[1], feats[0]):.3g}, prefill logits {rel(logits[1], logits[0]):.3g}")
    assert rel(feats[1], feats[0]) <= VISION_TOL
    assert rel(logits[1], logits[0]) <= LOGIT_TOL


def test_45_golden_vision_and_prefill_within_tolerance(monkeypatch):
    from minicpmv.state import SingleSequence

    case = case_of("4.5", "a_single_image_sliced")
    model = load(version_dir("4.5") / "model", monkeypatch)
    assert type(model.llm.lm_head) is Bf16Linear
    out, g = case.process(), case.tensors
    with torch.inference_mode():
        feats = model.encode_vision(out.pixel_values, out.target_sizes, None)
        embeds = model.embed(torch.tensor(out.input_ids), {out.placeholder_id: feats})
        hidden = model(embeds, SingleSequence.for_model(model, len(out.input_ids)).batch(len(out.input_ids)))
        logits = model.logits(hidden[0, -1])
    vision = feats.view(g["vision_embeddings"].shape)
    print(f"4.5 bf16 path: vision {rel(vision, g['vision_embeddings']):.3g}, "
          f"prefill logits {rel(logits, g['last_logits']):.3g}")
    assert rel(vision, g["vision_embeddings"]) <= VISION_TOL
    assert rel(logits, g["last_logits"]) <= LOGIT_TOL


@pytest.mark.parametrize("version", ["4.6", "4.5"])
def test_greedy_agreement_with_bf16_text_matrices(tiny46, monkeypatch, version):
    folder, vocab = (tiny46, 248000) if version == "4.6" else (version_dir("4.5") / "model", 1040)
    prompt = torch.randint(10, vocab - 10, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    exact, _ = load_model(folder, "float32", "cpu", progress=False)
    acc = accuracy(exact, load(folder, monkeypatch), prompt, 256)
    print(f"{version} bf16 text matrices: {acc}")
    assert acc.top1_agreement >= TOP1[version]


def test_auto_on_this_cpu_within_the_bf16_tolerance(tiny46):
    """Whatever "auto" picks on the CPU running the tests (exact fp32 math on AVX2, bf16 vision and
    one-call norms from AVX-512 up, bf16 text with AMX) stays within the bf16 path's tolerance."""
    from transformers import AutoProcessor

    from test_parity46 import our_prefill_logits

    processor = AutoProcessor.from_pretrained(tiny46)
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    inputs = ref_inputs(processor, image, images=[[picture(300, 300, 2)]])
    ids, vision = inputs["input_ids"][0].tolist(), our_vision(inputs, "16x")
    exact, _ = load_model(tiny46, "float32", "cpu", progress=False)
    auto, _ = load_model(tiny46, "auto", "cpu", progress=False)
    with torch.inference_mode():
        error = rel(our_prefill_logits(auto, ids, vision), our_prefill_logits(exact, ids, vision))
    print(f"auto on this CPU ({auto.kernel_plan.cpu.level}): prefill logits {error:.3g}")
    assert error <= LOGIT_TOL
