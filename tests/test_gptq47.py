"""GPTQ int4 on MiniCPM-V 4.7 (dense): `minicpmv quantize` calibrates with the canvas positions
and our int4 load matches a float model holding our own dequantization of the written tensors,
on an image prompt run at its canvas positions."""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from minicpmv.families import adapter_for
from minicpmv.loading import load_model
from minicpmv.quant.gptq_format import GPTQSpec, dequantize_gptq
from minicpmv.quant.gptq_linear import GPTQLinear
from minicpmv.quant.quantize_cli import engine_run_sample, quantize_folder, synthetic_images
from test_gptq_roundtrip import tensors


def test_dense_47_int4_load_equals_dequantized_reference(tiny47_dense_dir, tmp_path):
    spec = GPTQSpec(4, 32, True, False, "gptq")
    out = tmp_path / "gptq"
    quantize_folder(tiny47_dense_dir, out, spec, progress=False, num_samples=4, max_tokens=128)
    ours, config = load_model(out, "float32", "cpu", progress=False)
    layers = [n for n, m in ours.named_modules() if isinstance(m, GPTQLinear)]
    assert len(layers) == 26
    ref, _ = load_model(tiny47_dense_dir, "float32", "cpu", progress=False)
    dst = tensors(out)
    with torch.no_grad():
        for name in layers:
            p = f"model.{name}"
            ref.get_submodule(name).weight.copy_(dequantize_gptq(dst[f"{p}.qweight"], dst[f"{p}.qzeros"],
                                                                 dst[f"{p}.scales"], dst[f"{p}.g_idx"], spec.bits,
                                                                 spec.format))
    dense_ours = copy.deepcopy(ours)
    for m in dense_ours.modules():
        if isinstance(m, GPTQLinear):
            m.prepare("dense")
    family = adapter_for(out, config, Tokenizer.from_file(str(out / "tokenizer.json")))
    prepared = family.prepare([{"role": "user", "content": [{"type": "image", "image": synthetic_images(1, seed=3)[0]},
                                                            "What is in the picture?"]}])
    assert prepared.rope_delta < 0
    sample = {"input_ids": torch.tensor(prepared.input_ids), "vision": prepared.vision,
              "position_ids": prepared.position_ids}
    with torch.no_grad():
        r = ref.logits(engine_run_sample(ref)(sample)[0, -1])
        torch.testing.assert_close(dense_ours.logits(engine_run_sample(dense_ours)(sample)[0, -1]), r, rtol=0,
                                   atol=1e-4)
        k = ours.logits(engine_run_sample(ours)(sample)[0, -1])
    assert ((k - r).norm() / r.norm()).item() < 0.05


def test_moe_gptq_quantizes_the_mixers_and_keeps_experts_float(tiny47_moe_dir, tmp_path):
    """Our quantizer's recipe covers attention and DeltaNet projections; routed experts, the
    shared expert and the router stay in floating point and the result loads."""
    out = tmp_path / "gptq-moe"
    quantize_folder(tiny47_moe_dir, out, GPTQSpec(4, 32, True, False, "gptq"), progress=False, num_samples=2,
                    max_tokens=64)
    ours, _ = load_model(out, "float32", "cpu", progress=False)
    quantized = [n for n, m in ours.named_modules() if isinstance(m, GPTQLinear)]
    assert quantized and not any(".mlp." in n for n in quantized)
    # a checkpoint with quantized per-expert tensors is refused with a clear message
    dst = tensors(out)
    key = "model.language_model.layers.0.mlp.experts.0.gate_proj"
    dst[f"{key}.qweight"] = torch.zeros(8, 32, dtype=torch.int32)
    save_file(dst, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="quantized MoE experts are not supported"):
        load_model(out, "float32", "cpu", progress=False)
