"""The CPU fast path against the oracle: a bf16 checkpoint loaded with dtype="auto" on CPU with
the AVX2-era kernels (isa="avx2", what "auto" picks on CPUs without bf16 units) keeps its matrices
narrow (vision: bf16 upcast per call, text: fbgemm fp16-packed) and computes in fp32, so it must
match transformers running the same checkpoint upcast to fp32: logits within 1e-4 and greedy
tokens identical, alone and in a batched decode. The bf16-unit path has its own tolerance
(tests/test_cpu_bf16_path.py)."""
import pytest
import torch

from minicpmv.engine.engine import Engine
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence
from minicpmv.layers import fp16_packed
from minicpmv.layers.fp16_packed import PackedFP16Linear
from minicpmv.loading import load_model
from test_parity46 import N_TOKENS, our_prefill_logits, our_vision, picture, ref_inputs
from tiny46 import build_tiny_46


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoProcessor, MiniCPMV4_6ForConditionalGeneration

    folder = build_tiny_46(tmp_path_factory.mktemp("tiny46-bf16"), seed=1, dtype=torch.bfloat16)
    ref = MiniCPMV4_6ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ours, _ = load_model(folder, "auto", "cpu", progress=False, isa="avx2")
    return ref, ours, AutoProcessor.from_pretrained(folder)


def test_auto_on_cpu_keeps_a_bf16_checkpoint_narrow(models):
    _, ours, _ = models
    assert ours.dtype == torch.float32  # activations and caches
    assert ours.vision_tower.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert ours.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert fp16_packed.available(), "x86-64 torch builds ship fbgemm; CI runs on x86-64"
    assert isinstance(ours.lm_head, PackedFP16Linear)
    layers = ours.language_model.layers
    assert isinstance(layers[0].mlp.down_proj, PackedFP16Linear)
    # fused products (one GEMV per group of projections reading the same input)
    assert isinstance(layers[0].mlp.gate_up_proj, PackedFP16Linear) and layers[0].mlp.gate_proj is None
    assert isinstance(layers[0].linear_attn.in_proj, PackedFP16Linear) and layers[0].linear_attn.in_proj_a is None
    assert isinstance(layers[1].self_attn.qkv_proj, PackedFP16Linear) and layers[1].self_attn.k_proj is None


def greedy(ours, prompts, **settings):
    """Decode every (ids, vision) prompt together in one engine; returns their tokens."""
    engine = Engine(ours, max_context=4096, **settings)
    seqs = [engine.add(Sequence(list(ids), SamplingParams(max_new_tokens=N_TOKENS, do_sample=False), vision))
            for ids, vision in prompts]
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


def test_logits_and_tokens_match_transformers_fp32(models):
    ref, ours, processor = models
    text = [{"role": "user", "content": [{"type": "text", "text": "Name three prime numbers and explain why."}]}]
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    cases = [ref_inputs(processor, text), ref_inputs(processor, image, images=[[picture(390, 1130, 1)]]),
             ref_inputs(processor, image, images=[[picture(300, 300, 2)]])]
    prompts, expected = [], []
    for inputs in cases:
        ids = inputs["input_ids"][0].tolist()
        with torch.no_grad():
            ref_logits = ref(**{k: v for k, v in inputs.items() if k != "attention_mask"}).logits[0, -1]
            expected.append(ref.generate(**inputs, max_new_tokens=N_TOKENS, do_sample=False, eos_token_id=None,
                                         pad_token_id=0)[0, len(ids):].tolist())
            diff = (our_prefill_logits(ours, ids, our_vision(inputs, "16x")) - ref_logits).abs().max().item()
        print(f"max |logit diff| vs transformers fp32: {diff:.2e}")
        assert diff < 1e-4
        prompts.append((ids, our_vision(inputs, "16x")))
    assert [greedy(ours, [p])[0] for p in prompts] == expected  # one at a time
    assert greedy(ours, prompts) == expected  # decoded together
