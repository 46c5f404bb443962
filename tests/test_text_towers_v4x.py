"""The 4.0 (Llama + LongRoPE) and 4.5 (Qwen3) text towers against transformers' own classes, with
random tiny weights: a prefill through the per-sequence KV cache, then decode steps. The LongRoPE case
uses distinct long/short factors and a factor > 1 (the real 4.0 config has identical sets and factor 1,
which the goldens cover), so the long-context switch and the attention factor are checked too."""
from __future__ import annotations

import pytest
import torch

from minicpmv.state import SingleSequence
from minicpmv.models.llama import LlamaConfig, LlamaForCausalLM
from minicpmv.models.qwen3 import Qwen3ForCausalLM

torch.set_num_threads(1)

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")


def run_ours(model, ids: torch.Tensor, decode_steps: int) -> torch.Tensor:
    """Prefill ids[:-decode_steps], then feed the rest one token at a time; logits of every fed position."""
    prompt = ids[: len(ids) - decode_steps]
    state = SingleSequence(model.model.state_spec(), len(ids), torch.float32)
    emb = model.model.embed_tokens
    out = [model.lm_head(model.model(emb(prompt)[None], state.batch(len(prompt))))[0]]
    for pos in range(len(prompt), len(ids)):
        h = model.model(emb(ids[pos:pos + 1])[None], state.batch(1))
        out.append(model.lm_head(h)[0])
    return torch.cat(out)


def build_pair(hf_cls, ours_cls, hf_config):
    torch.manual_seed(0)
    reference = hf_cls(hf_config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) * (2.0 / p.shape[-1] ** 0.5))
    ours = ours_cls(LlamaConfig.from_dict(hf_config.to_dict())).eval()
    missing, unexpected = ours.load_state_dict(reference.state_dict(), strict=False)
    assert not missing and not [k for k in unexpected if "rotary" not in k]
    return reference, ours


@pytest.mark.parametrize("length", [40, 100])  # below / above original_max_position_embeddings (64)
def test_llama_longrope_matches_transformers(length):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    g = torch.Generator().manual_seed(1)
    short = (1 + torch.rand(12, generator=g) * 3).tolist()
    long = (1 + torch.rand(12, generator=g) * 30).tolist()
    cfg = HFLlamaConfig(**BASE, max_position_embeddings=256, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "short_factor": short, "long_factor": long})
    reference, ours = build_pair(HFLlama, LlamaForCausalLM, cfg)
    assert ours.model.rotary.attention_factor > 1.0
    ids = torch.randint(0, 300, (length,), generator=g)
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
        got = run_ours(ours, ids, decode_steps=0)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_qwen3_matches_transformers_through_the_cache():
    from transformers import Qwen3Config, Qwen3ForCausalLM as HFQwen3

    cfg = Qwen3Config(**BASE, max_position_embeddings=4096, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 1e6})
    reference, ours = build_pair(HFQwen3, Qwen3ForCausalLM, cfg)
    ids = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
        got = run_ours(ours, ids, decode_steps=8)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_mup_scaled_configs_are_refused():
    with pytest.raises(ValueError, match="scale_emb"):
        LlamaConfig.from_dict({**BASE, "scale_emb": 12})
