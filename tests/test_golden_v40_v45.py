"""MiniCPM-V 4.0 / 4.5 against the golden outputs of the reference code (tiny random checkpoints, fp32).

For every case: the chat-template prompt, the expanded prompt and its token ids, the crops (pixel for
pixel) and their patch grids, the resampler output, the prefill logits, and 12 greedy tokens (with their
step logits) generated through the Engine. The fixtures live beside the repository in
shared/fixtures/golden; a missing fixture is a failure, not a skip.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from minicpmv.engine.engine import Engine
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence
from minicpmv.state import SingleSequence
from minicpmv.layers.fp16_packed import PackedFP16Linear
from minicpmv.loading import load_model
from minicpmv.processing.processor_v4x import ProcessorV4x
from minicpmv.prompt.chat_template import ChatTemplate

torch.set_num_threads(1)

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "golden"
CASES = [("4.0", "a_single_image_sliced"), ("4.0", "b_two_images"),
         ("4.5", "a_single_image_sliced"), ("4.5", "b_two_images"), ("4.5", "c_video_temporal_packing"),
         ("4.5", "d_thinking_true"), ("4.5", "d_thinking_false")]
IDS = [f"{v}-{c}" for v, c in CASES]
ATOL = 1e-4


def version_dir(version: str) -> Path:
    return GOLDEN / f"minicpm-v-{version}"


@lru_cache(maxsize=None)
def model_of(version: str, dtype: str = "float32"):
    # "auto" with the AVX2-era kernels (fp32 math on 16-bit storage); the bf16-unit kernels that
    # "auto" picks on other CPUs have their own tolerance (tests/test_cpu_bf16_path.py)
    isa = "avx2" if dtype == "auto" else None
    model, _ = load_model(version_dir(version) / "model", dtype, "cpu", progress=False, isa=isa)
    return model


@lru_cache(maxsize=None)
def processor_of(version: str) -> ProcessorV4x:
    return ProcessorV4x.from_folder(version_dir(version) / "model")


class Case:
    def __init__(self, version: str, name: str):
        self.version, self.dir = version, version_dir(version) / name
        assert self.dir.is_dir(), f"golden fixture missing: {self.dir}"
        self.request = json.loads((self.dir / "inputs" / "request.json").read_text())
        self.golden = json.loads((self.dir / "golden" / "golden.json").read_text())
        self.tensors = load_file(str(self.dir / "golden" / "golden.safetensors"))
        self.images = [Image.open(self.dir / "inputs" / f).convert("RGB") for f in self.request["images"]]
        self.kwargs = self.request["chat_kwargs"]

    def messages(self) -> list[dict]:
        """The model-card chat(): images become the marker, content items are joined by newlines."""
        out = []
        for m in self.request["msgs"]:
            parts = ["(<image>./</image>)" if isinstance(p, str) and p.startswith("IMG") and p[3:].isdigit() else p
                     for p in m["content"]]
            out.append({"role": m["role"], "content": "\n".join(parts)})
        return out

    def process(self):
        k = self.kwargs
        return processor_of(self.version)(self.golden["chat_template_prompt"], self.images,
                                          max_slice_nums=k.get("max_slice_nums"), use_image_id=k.get("use_image_id"),
                                          temporal_ids=k.get("temporal_ids"))


@lru_cache(maxsize=None)
def case_of(version: str, name: str) -> Case:
    return Case(version, name)


def test_fixture_list_matches_manifest():
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    listed = sorted((v, c) for v, info in manifest["versions"].items() for c in info["cases"])
    assert listed == sorted(CASES)


@pytest.mark.parametrize("version,name", CASES, ids=IDS)
def test_chat_template_prompt(version, name):
    case = case_of(version, name)
    expected = (case.dir / "golden" / "prompt_chat_template.txt").read_text(encoding="utf-8")
    assert expected == case.golden["chat_template_prompt"]
    template = ChatTemplate.from_folder(version_dir(version) / "model")
    # 4.5's chat() always passes enable_thinking (default False); 4.0's template has no such switch
    extra = {"enable_thinking": case.kwargs.get("enable_thinking", False)} if version == "4.5" else {}
    assert template.render(case.messages(), add_generation_prompt=True, **extra) == expected


@pytest.mark.parametrize("version,name", CASES, ids=IDS)
def test_processor(version, name):
    case = case_of(version, name)
    out = case.process()
    assert out.prompt == (case.dir / "golden" / "prompt_expanded.txt").read_text(encoding="utf-8")
    assert out.input_ids == case.golden["input_ids"] == case.tensors["input_ids"][0].tolist()
    assert out.target_sizes.tolist() == case.golden["tgt_sizes"]
    assert [list(b) for b in out.image_bounds] == case.golden["image_bound"]
    if version == "4.0":  # 4.0 has no temporal resampler input at all
        assert out.temporal_ids is None and case.golden["temporal_ids_model_input"] is None
    else:  # 4.5 images: the reference passes [-1] per unit; None means the same to our resampler
        assert (out.temporal_ids or [[-1]] * len(out.image_bounds)) == case.golden["temporal_ids_model_input"]
    offset = 0
    for crop, ref in zip(out.crops, case.golden["slices"], strict=True):
        assert np.array_equal(np.asarray(crop), np.asarray(Image.open(case.dir / "golden" / ref["file"]).convert("RGB")))
        h, w = ref["tgt_size_hw"]
        strip = out.pixel_values[0, :, :, offset:offset + h * w * 14].double()
        offset += h * w * 14
        assert list(strip.shape) == ref["pixel_values_shape"]
        assert strip.sum().item() == pytest.approx(ref["pixel_sum"], abs=1e-6)
        assert strip.abs().sum().item() == pytest.approx(ref["pixel_abs_sum"], abs=1e-6)
        assert strip.flatten()[:5].tolist() == pytest.approx(ref["pixel_first5"], abs=0)
    assert offset == out.pixel_values.shape[-1]


@pytest.mark.parametrize("version,name", CASES, ids=IDS)
def test_vision_and_prefill_logits(version, name):
    case, model = case_of(version, name), model_of(version)
    out, g = case.process(), case.tensors
    with torch.inference_mode():
        vit = model.vpm(out.pixel_values, out.target_sizes, model.config.vision_batch_size)
        lengths = [h * w for h, w in out.target_sizes.tolist()]
        for i, rows in enumerate(torch.split(vit, lengths)):  # padded rows of the reference are garbage
            torch.testing.assert_close(rows, g["vpm_last_hidden_state"][i, :len(rows)], atol=ATOL, rtol=0)
        feats = model.encode_vision(out.pixel_values, out.target_sizes, None,
                                    **({"temporal_ids": out.temporal_ids} if out.temporal_ids else {}))
        vision = feats.view(g["vision_embeddings"].shape)
        torch.testing.assert_close(vision, g["vision_embeddings"], atol=ATOL, rtol=0)
        ids = torch.tensor(out.input_ids)
        embeds = model.embed(ids, {out.placeholder_id: feats})
        torch.testing.assert_close(embeds, g["inputs_embeds"], atol=ATOL, rtol=0)
        hidden = model(embeds, SingleSequence.for_model(model, len(ids)).batch(len(ids)))
        logits = model.logits(hidden[0, -1])
    torch.testing.assert_close(logits, g["last_logits"], atol=ATOL, rtol=ATOL)
    assert int(logits.argmax()) == int(g["last_logits"].argmax())


@pytest.mark.parametrize("dtype", ["float32", "auto"])
@pytest.mark.parametrize("version,name", CASES, ids=IDS)
def test_engine_greedy_tokens(version, name, dtype):
    """"auto" on CPU keeps these bf16 checkpoints narrow: bf16 vision matrices upcast per call and
    fused, fp16-packed text matrices (layers/fp16_packed.py), all with fp32 math, so it must meet
    the same tolerance as the fp32 load."""
    case, model = case_of(version, name), model_of(version, dtype)
    if dtype == "auto":
        assert isinstance(model.llm.lm_head, PackedFP16Linear)
        assert isinstance(model.llm.model.layers[0].mlp.gate_up_proj, PackedFP16Linear)
        assert isinstance(model.llm.model.layers[0].self_attn.qkv_proj, PackedFP16Linear)
    out, g = case.process(), case.tensors
    recorded = []
    engine = Engine(model, max_context=4096)
    original = model.logits

    def recording_logits(hidden):
        logits = original(hidden)
        recorded.append(logits.reshape(-1, logits.shape[-1]).clone())
        return logits

    model.logits = recording_logits
    try:
        seq = engine.add(Sequence(out.input_ids, SamplingParams(max_new_tokens=12, do_sample=False),
                                  out.vision_inputs()))
        while engine.has_work():
            engine.step()
    finally:
        del model.logits
    assert seq.output_ids == g["generated_ids"].tolist() == case.golden["generated_ids"]
    torch.testing.assert_close(torch.cat(recorded), g["generate_step_logits"], atol=ATOL, rtol=ATOL)


def test_drop_vision_last_layer_ignores_that_layers_weights(tmp_path):
    """drop_vision_last_layer: the reference truncates the tower before loading, so the checkpoint's
    last-layer tensors are skipped and the tower output is the penultimate layer's (post-layernormed)."""
    source = version_dir("4.5") / "model"
    config = json.loads((source / "config.json").read_text())
    config["drop_vision_last_layer"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(source / "model.safetensors")
    model, _ = load_model(tmp_path, "float32", "cpu", progress=False)
    full = model_of("4.5")
    assert len(model.vpm.encoder.layers) == len(full.vpm.encoder.layers) - 1
    torch.testing.assert_close(model.vpm.encoder.layers[0].mlp.fc1.weight, full.vpm.encoder.layers[0].mlp.fc1.weight)
