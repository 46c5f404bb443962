"""Beam search (4.0/4.5's chat(sampling=False)) against transformers' own beam search.

Tiny random Llama / Qwen3 models are built with transformers, the same weights are loaded into our
towers, and both search with num_beams 3, repetition penalty 1.2: the output ids must be identical.
The penalty sees either only the generated tokens (generation from inputs_embeds, as the remote code
does) or the prompt too (generation from input_ids). Stop tokens are picked from the beam output so
that hypotheses finish early, and every length_penalty / early_stopping branch is exercised.
Then chat(sampling=False) on the golden 4.5 checkpoint is checked against transformers' beam search
over the same LLM fed our merged (text + vision) embeddings."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from torch import nn

from minicpmv.engine.beam_search import BeamSearchParams, beam_search
from minicpmv.engine.engine import Engine
from minicpmv.engine.sequence import Sequence
from minicpmv.models.llama import LlamaConfig, LlamaForCausalLM
from minicpmv.models.qwen3 import Qwen3ForCausalLM

torch.set_num_threads(1)

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")
PROMPT = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(3)).tolist()
MAX_NEW = 20


class TextOnly(nn.Module):
    """A bare text tower with the interface the engine drives (no vision)."""

    def __init__(self, lm: LlamaForCausalLM):
        super().__init__()
        self.lm = lm

    def state_spec(self):
        return self.lm.model.state_spec()

    @property
    def dtype(self):
        return self.lm.lm_head.weight.dtype

    def embed(self, ids, vision):
        return self.lm.model.embed_tokens(ids)[None]

    def forward(self, inputs_embeds, batch):
        return self.lm.model(inputs_embeds, batch)

    def logits(self, hidden):
        return self.lm.lm_head(hidden).float()


@lru_cache(maxsize=None)
def pair(kind: str):
    """(transformers model, our engine) with the same random weights."""
    import transformers

    if kind == "qwen3":
        cfg = transformers.Qwen3Config(**BASE, max_position_embeddings=4096,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        hf_cls, ours_cls = transformers.Qwen3ForCausalLM, Qwen3ForCausalLM
    else:
        cfg = transformers.LlamaConfig(**BASE, max_position_embeddings=4096,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e4})
        hf_cls, ours_cls = transformers.LlamaForCausalLM, LlamaForCausalLM
    torch.manual_seed(0)
    reference = hf_cls(cfg).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape) if "norm" in name else torch.randn(p.shape) / p.shape[-1] ** 0.5)
    ours = ours_cls(LlamaConfig.from_dict(cfg.to_dict())).eval()
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
    assert not missing and not [k for k in unexpected if "rotary" not in k]
    return reference, Engine(TextOnly(ours), max_context=4096)


def hf_generate(reference, *, from_embeds: bool, **kwargs) -> list[int]:
    ids = torch.tensor([PROMPT])
    kwargs = dict(do_sample=False, pad_token_id=0, max_new_tokens=MAX_NEW, **kwargs)
    with torch.no_grad():
        if from_embeds:  # only new tokens come back, and the penalty never sees the prompt
            return reference.generate(inputs_embeds=reference.model.embed_tokens(ids),
                                      attention_mask=torch.ones_like(ids), **kwargs)[0].tolist()
        return reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0, len(PROMPT):].tolist()


def ours_generate(engine, *, from_embeds: bool, eos_token_id, **kwargs) -> Sequence:
    params = BeamSearchParams(max_new_tokens=MAX_NEW, stop_token_ids=list(eos_token_id),
                              penalize_prompt=not from_embeds, **kwargs)
    return beam_search(engine, Sequence(prompt_ids=list(PROMPT), params=params))


@lru_cache(maxsize=None)
def stop_sets(kind: str) -> dict:
    """Stop tokens taken from the unstopped beam output (so hypotheses do finish), plus one never produced."""
    reference, _ = pair(kind)
    out = hf_generate(reference, from_embeds=True, num_beams=3, repetition_penalty=1.2, eos_token_id=[299])
    return {"late": [out[5]], "two": [out[3], out[9]], "early": [out[1]], "none": [299]}


ALL = [(1.0, False), (0.0, False), (2.0, False), (-1.0, False), (1.0, True), (1.0, "never"), (2.0, "never")]
DEFAULT = [(1.0, False)]  # (length_penalty, early_stopping): transformers' defaults, the remote code's search
CASES = [  # (tower, stop tokens, penalty sees the prompt too, searches)
    ("qwen3", "late", False, ALL), ("qwen3", "two", False, ALL), ("qwen3", "early", False, ALL),
    ("qwen3", "none", False, DEFAULT), ("qwen3", "late", True, DEFAULT + [(1.0, "never")]),
    ("qwen3", "early", True, DEFAULT), ("llama", "late", False, DEFAULT + [(1.0, True), (1.0, "never")]),
    ("llama", "two", False, DEFAULT + [(0.0, False)]), ("llama", "early", True, DEFAULT)]


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
@pytest.mark.parametrize("kind,stops,penalize_prompt,searches", CASES,
                         ids=[f"{k}-{s}-{'prompt' if p else 'generated'}" for k, s, p, _ in CASES])
def test_beam_search_matches_transformers(kind, stops, penalize_prompt, searches):
    reference, engine = pair(kind)
    eos = stop_sets(kind)[stops]
    for length_penalty, early_stopping in searches:
        kwargs = dict(num_beams=3, repetition_penalty=1.2, eos_token_id=eos, length_penalty=length_penalty,
                      early_stopping=early_stopping)
        expected = hf_generate(reference, from_embeds=not penalize_prompt, **kwargs)
        seq = ours_generate(engine, from_embeds=not penalize_prompt, **kwargs)
        assert seq.output_ids == expected, (length_penalty, early_stopping)
        assert seq.finish_reason == ("stop" if expected[-1] in eos else "length")
        assert len(expected) == MAX_NEW or expected[-1] in eos


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
def test_beams_differ_from_greedy_and_the_penalty_counts():
    """The comparisons above are not vacuous: beam search picks other tokens than greedy here, and the
    penalty (generated-only vs prompt too) changes the result."""
    reference, engine = pair("qwen3")
    eos = [299]
    greedy = hf_generate(reference, from_embeds=True, num_beams=1, repetition_penalty=1.2, eos_token_id=eos)
    beams = ours_generate(engine, from_embeds=True, num_beams=3, repetition_penalty=1.2, eos_token_id=eos).output_ids
    with_prompt = ours_generate(engine, from_embeds=False, num_beams=3, repetition_penalty=1.2,
                                eos_token_id=eos).output_ids
    assert beams != greedy and beams != with_prompt


def test_beam_params_validation():
    with pytest.raises(ValueError, match="beam sample"):
        BeamSearchParams(num_beams=3, do_sample=True)
    with pytest.raises(ValueError, match="early_stopping"):
        BeamSearchParams(num_beams=3, early_stopping="sometimes")


# -- chat(sampling=False) on the golden 4.5 checkpoint --------------------------------------------

def golden_45():
    from test_chat_v4x import GOLDEN, chat_model, model_card_call

    model = chat_model("4.5")
    msgs, kwargs, _ = model_card_call("4.5", "a_single_image_sliced")
    return model, msgs, {k: kwargs[k] for k in ("use_image_id", "max_slice_nums") if k in kwargs}, GOLDEN


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
def test_chat_sampling_false_is_the_reference_beam_search():
    import transformers
    from safetensors.torch import load_file

    model, msgs, options, golden = golden_45()
    params = model.sampling_params(sampling=False, max_new_tokens=24)
    assert isinstance(params, BeamSearchParams)
    assert (params.num_beams, params.repetition_penalty, params.length_penalty, params.early_stopping,
            params.penalize_prompt, params.do_sample) == (3, 1.2, 1.0, False, False, False)

    reply = model.chat(msgs=msgs, sampling=False, max_new_tokens=24, **options)
    # transformers' beam search over the same LLM, fed our text + vision embeddings (as the remote code
    # calls llm.generate(inputs_embeds=...) with num_beams=3, repetition_penalty=1.2)
    prepared = model.prepare(msgs, **options)
    engine = model.engine
    with torch.no_grad():
        features = {}
        for v in prepared.vision:
            feats = engine.runner.encode_unit(v)
            features[v.token_id] = torch.cat([features[v.token_id], feats]) if v.token_id in features else feats
        embeds = engine.model.embed(torch.tensor(prepared.input_ids), features)
        cfg = transformers.Qwen3Config(**{k: v for k, v in model.config.items() if k not in ("architectures", "auto_map")})
        llm = transformers.Qwen3ForCausalLM(cfg).eval()
        weights = load_file(str(golden / "minicpm-v-4.5" / "model" / "model.safetensors"))
        llm.load_state_dict({k[4:]: t.float() for k, t in weights.items() if k.startswith("llm.")})
        expected = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                num_beams=3, repetition_penalty=1.2, max_new_tokens=24, do_sample=False,
                                eos_token_id=list(model.family.stop_token_ids), pad_token_id=0)[0].tolist()
    stop_ids = set(model.family.stop_token_ids)
    assert reply.raw == model.tokenizer.decode([t for t in expected if t not in stop_ids], skip_special_tokens=False)
    assert reply.usage["completion_tokens"] == len(expected)

    # num_beams=1 turns the same call into greedy search with the 1.2 penalty, which answers differently here
    greedy = model.chat(msgs=msgs, sampling=False, num_beams=1, max_new_tokens=24, **options)
    assert greedy.raw != reply.raw
    # streaming a beam search yields the final text once the search is over
    streamed = "".join(model.chat(msgs=msgs, sampling=False, max_new_tokens=24, stream=True, **options))
    assert streamed == str(reply)
