"""GPTQ under dtype="float32" is computed exactly as transformers 5.23 + gptqmodel compute it in fp32: every
quantized weight dequantized once as s * (q - z) rounded to fp16 (the scales' dtype), then fp32 math; no bf16
activations, no bf16 scales. Checked per checkpoint format on the tiny random 4.6 model, whose chaotic dynamics
turn any rounding difference into different tokens: greedy ids must be identical and logits agree to ~1e-5.

The checkpoints are written here: random codes, scales and zero points on each LLM linear (the quantizer is not
under test), packed by our GPTQ writer in every format the issue names: symmetric and asymmetric, act-order,
v1 and v2, group sizes 32/64/128, a last group shorter than the group size, and the raw `quantize_config` that
gptqmodel itself writes (no `modules_in_block_to_quantize`: the dense linears inside a quantized block, such as
DeltaNet's in_proj_a/b, are known only by having no `qweight`)."""
import json
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer

from minicpmv.engine.engine import Engine
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence
from minicpmv.families import adapter_for
from minicpmv.loading import load_model
from minicpmv.quant.apply import GPTQConfig, select_gptq_targets
from minicpmv.quant.gptq_format import GPTQSpec, default_g_idx, pack_gptq
from minicpmv.quant.gptq_linear import GPTQLinear
from minicpmv.quant.quantize_cli import (DEFAULT_SEQUENTIAL_GROUPS, quantization_config_dict,
                                         synthetic_images, write_quantized_checkpoint)
from minicpmv.quant.gptq import GPTQParams

N_TOKENS = 8


def gptqmodel_raw_config(spec: GPTQSpec) -> dict:
    """What gptqmodel 7.7's QuantizeConfig(...).to_dict() writes (its own keys, no module list)."""
    return {"bits": spec.bits, "group_size": spec.group_size, "desc_act": spec.desc_act, "lm_head": False,
            "method": "gptq", "quant_method": "gptq", "format": spec.format, "checkpoint_format": spec.format,
            "pack_dtype": "int32", "meta": {"fallback": {"strategy": "rtn", "threshold": "0.5%", "smooth": None},
                                            "pack_impl": "auto", "mse": 0.0, "act_group_aware": False},
            "sym": spec.sym}


# name -> (spec, who wrote the config, text-tower overrides of the tiny model, gptqmodel backend of the reference)
# The reference's auto kernel on AVX512-BF16 machines (TorchCpuAvx512Linear) refuses an in_features that the
# group size does not divide; gptqmodel's "torch" kernel pads such a layer, so the short-last-group variant
# is compared with that one.
WIDE = {"hidden_size": 128, "intermediate_size": 256, "linear_value_head_dim": 32}  # every in_features >= 128
ODD = {"hidden_size": 96, "intermediate_size": 192}  # 96 inputs in groups of 64: 64 + a last group of 32
VARIANTS = {
    "v1-sym-g32": (GPTQSpec(4, 32, True, False, "gptq"), "ours", {}, "auto"),
    "v1-asym-g64": (GPTQSpec(4, 64, False, False, "gptq"), "ours", {}, "auto"),
    "v1-sym-actorder-g32": (GPTQSpec(4, 32, True, True, "gptq"), "ours", {}, "auto"),
    "v2-asym-actorder-g64": (GPTQSpec(4, 64, False, True, "gptq_v2"), "ours", {}, "auto"),
    "v2-sym-g128": (GPTQSpec(4, 128, True, False, "gptq_v2"), "ours", WIDE, "auto"),
    "v1-asym-g64-short-last-group": (GPTQSpec(4, 64, False, False, "gptq"), "ours", ODD, "torch"),
    "gptqmodel-raw-config-asym-actorder": (GPTQSpec(4, 32, False, True, "gptq"), "gptqmodel", {}, "auto"),
}


def random_gptq_tensors(linear: torch.nn.Linear, spec: GPTQSpec, g: torch.Generator) -> dict:
    N, K = linear.out_features, linear.in_features
    G, gl = spec.num_groups(K), spec.group_len(K)
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.01) * 8 / K ** 0.5
    zeros = torch.full((G, N), 8) if spec.sym else torch.randint(1, 16, (G, N), generator=g)
    g_idx = (torch.argsort(torch.randperm(K, generator=g)) // gl).to(torch.int32) if spec.desc_act \
        else default_g_idx(K, spec.group_size)
    codes = torch.randint(0, 16, (K, N), generator=g)
    weight = (scales[g_idx.long()] * (codes - zeros[g_idx.long()])).t()
    bias = None if linear.bias is None else torch.randn(N, generator=g) * 0.01
    return pack_gptq(weight, scales, zeros, g_idx, spec, bias)


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tiny46_dir, tmp_path_factory):
    from tiny46 import build_tiny_46

    spec, writer, dims, backend = VARIANTS[request.param]
    dense = build_tiny_46(tmp_path_factory.mktemp("dense"), seed=1, **dims) if dims else tiny46_dir
    model, _ = load_model(dense, "float32", "cpu", progress=False, pack_per_token=False)
    groups = DEFAULT_SEQUENTIAL_GROUPS
    targets = select_gptq_targets(model, GPTQConfig(base=spec, modules_in_block_to_quantize=groups))
    g = torch.Generator().manual_seed(len(request.param))
    tensors = {name: random_gptq_tensors(model.get_submodule(name), spec, g) for name in sorted(targets)}
    qconfig = quantization_config_dict(spec, GPTQParams(), groups) if writer == "ours" else gptqmodel_raw_config(spec)
    out = tmp_path_factory.mktemp(request.param)
    write_quantized_checkpoint(dense, out, model, SimpleNamespace(tensors=tensors), qconfig)
    return request.param, spec, out, reference_folder(out, groups, tmp_path_factory), backend


def reference_folder(folder, groups, tmp_path_factory):
    """The folder transformers loads. With gptqmodel's raw config it cannot tell the dense linears of a block
    from the quantized ones (it would make in_proj_a, 4 outputs, a GPTQ layer and fail), so its copy of the
    config names the quantized modules; the tensors are the same files."""
    config = json.loads((folder / "config.json").read_text())
    if "modules_in_block_to_quantize" in config["quantization_config"]:
        return folder
    ref = tmp_path_factory.mktemp("reference")
    for f in folder.iterdir():
        (ref / f.name).symlink_to(f)
    config["quantization_config"]["modules_in_block_to_quantize"] = groups
    (ref / "config.json").unlink()
    (ref / "config.json").write_text(json.dumps(config))
    return ref


def prompts(folder, with_image: bool):
    config = json.loads((folder / "config.json").read_text())
    family = adapter_for(folder, config, Tokenizer.from_file(str(folder / "tokenizer.json")))
    cases = [family.prepare([{"role": "user", "content": "Write a haiku about quantized weights."}])]
    if with_image:
        cases.append(family.prepare([{"role": "user", "content": [
            {"type": "image", "image": synthetic_images(1, seed=3)[0]}, "What is in the picture?"]}]))
    return [(p.input_ids, p.vision) for p in cases]


def greedy_and_logits(model, ids, vision):
    engine = Engine(model, max_context=4096)
    seen = []
    params = SamplingParams(max_new_tokens=N_TOKENS, do_sample=False)
    params.logits_processors.append(lambda out, logits: seen.append(logits.float().clone()) or logits)
    seq = engine.add(Sequence(list(ids), params, vision))
    while engine.has_work():
        engine.step()
    return seq.output_ids, torch.stack(seen)


def test_fp32_matches_transformers_gptqmodel(checkpoint):
    import gptqmodel  # noqa: F401  (the oracle must be installed)
    from transformers import AutoModelForImageTextToText

    from transformers import GPTQConfig

    name, spec, folder, ref_folder, backend = checkpoint
    ours, _ = load_model(folder, "float32", "cpu", progress=False)
    layers = [m for m in ours.modules() if isinstance(m, GPTQLinear)]
    assert len(layers) == 26 and all(m.backend == "fp16_weight" for m in layers)
    dense_in_block = [n for n, m in ours.named_modules() if n.endswith(("in_proj_a", "in_proj_b"))]
    assert dense_in_block and all(type(ours.get_submodule(n)) is not GPTQLinear for n in dense_in_block)

    ref = AutoModelForImageTextToText.from_pretrained(ref_folder, dtype=torch.float32, device_map="cpu",
                                                      quantization_config=GPTQConfig(bits=4, backend=backend)).eval()
    assert type(ref.model.language_model.layers[0].mlp.gate_proj).__name__ != "Linear"
    for ids, vision in prompts(folder, with_image=name.startswith("v2-asym")):
        kwargs = {"input_ids": torch.tensor([ids])}
        for v in vision:
            kwargs["pixel_values"], kwargs["target_sizes"] = v.pixel_values, v.target_sizes
        with torch.no_grad():
            out = ref.generate(**kwargs, max_new_tokens=N_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                               output_logits=True, return_dict_in_generate=True)
        theirs_ids = out.sequences[0, len(ids):].tolist()
        theirs_logits = torch.stack([step[0].float() for step in out.logits])
        mine_ids, mine_logits = greedy_and_logits(ours, ids, vision)
        diff = (mine_logits - theirs_logits).abs().max().item()
        print(f"\n{name} vision={bool(vision)}: max |logit diff| over {N_TOKENS} steps {diff:.2e} "
              f"(logit scale {theirs_logits.abs().max().item():.1f})")
        assert mine_ids == theirs_ids
        assert diff < 1e-3
