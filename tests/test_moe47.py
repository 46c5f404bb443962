"""The Qwen3.5-MoE block of MiniCPM-V 4.7: routing normalisation, expert compute grouped by
expert (two matmuls per active expert, however many tokens), the per-expert and fused 3-D
checkpoint layouts loading to the same weights, and clear errors for incomplete experts."""
import pytest
import torch
import torch.nn.functional as F

from minicpmv.layers import moe
from minicpmv.layers.moe import SparseMoeBlock, route
from minicpmv.loading import load_model
from minicpmv.models.expert_layout import ExpertStacker


def block(seed=0, E=8, k=3, D=16, I=12, Is=10):
    torch.manual_seed(seed)
    b = SparseMoeBlock(D, E, k, I, Is)
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.5)
    return b


def per_token_reference(b: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The block written token by token from the spec (v47.md section 3)."""
    out = []
    for t in x:
        p = torch.softmax(b.gate.weight @ t, -1)
        w, e = torch.topk(p, b.top_k)
        w = w / w.sum()
        y = sum(wi * (F.silu(b.experts.gate_up_proj[ei].chunk(2)[0] @ t) * (b.experts.gate_up_proj[ei].chunk(2)[1] @ t)
                      ) @ b.experts.down_proj[ei].T for wi, ei in zip(w, e.tolist()))
        shared = torch.sigmoid(b.shared_expert_gate.weight @ t) * b.shared_expert(t[None])[0]
        out.append(y + shared)
    return torch.stack(out)


def test_route_renormalises_the_top_k():
    logits = torch.randn(5, 8)
    weights, experts = route(logits, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    assert torch.equal(experts, torch.topk(logits, 3).indices)


def test_block_equals_the_per_token_definition():
    b = block()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(b(x), per_token_reference(b, x.reshape(-1, 16)).reshape(2, 7, 16),
                                   rtol=1e-5, atol=1e-5)


def test_compute_is_grouped_by_expert(monkeypatch):
    """64 tokens x 3 experts each over 8 experts: 2 matmuls per active expert, not per token."""
    b = block(E=8, k=3)
    x = torch.randn(64, 16)
    calls = []
    real = F.linear

    def counting(inp, w, bias=None):
        calls.append(inp.shape[0])
        return real(inp, w, bias)

    with torch.no_grad():
        weights, experts = route(b.gate(x), b.top_k)
        monkeypatch.setattr(moe.F, "linear", counting)
        b.experts(x, experts, weights)
    active = len(experts.unique())
    assert len(calls) == 2 * active and sum(calls) == 2 * 64 * 3


def test_expert_layouts_load_to_the_same_weights(tiny47_moe_dir, tiny47_moe_fused_dir):
    per_expert, _ = load_model(tiny47_moe_dir, "float32", "cpu", progress=False)
    fused, _ = load_model(tiny47_moe_fused_dir, "float32", "cpu", progress=False)
    a, b = per_expert.state_dict(), fused.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["language_model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 64)


def test_incomplete_or_unknown_experts_are_clear_errors():
    pieces = [(f"m.experts.{e}.{p}.weight", torch.zeros(4, 2)) for e in range(2) for p in ("gate_proj", "up_proj")]
    stacker = ExpertStacker(2)
    (key, fused), = list(stacker.feed(pieces))
    assert key == "m.experts.gate_up_proj" and fused.shape == (2, 8, 2)
    stacker.finish()
    stacker = ExpertStacker(3)
    assert list(stacker.feed(pieces)) == []
    with pytest.raises(KeyError, match="incomplete per-expert tensors for m.experts.gate_up_proj"):
        stacker.finish()
    with pytest.raises(KeyError, match="expert 2 but the config has 2"):
        list(ExpertStacker(2).feed([("m.experts.2.down_proj.weight", torch.zeros(2, 4))]))
