"""The fewer-op forms of the decode-step pieces against their plain formulas: the DeltaNet
recurrent step (3-D bmm + baddbmm_ into the state), the one-call RMSNorms the CPU plan turns on
(layers/norm.py `fused`), and the tiny 4.6 model with them on against the plain fp32 load."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from minicpmv.cpu.apply import apply_plan
from minicpmv.cpu.isa import detect
from minicpmv.cpu.plan import rule_plan
from minicpmv.layers.gated_delta import prefill_gated_delta_rule, recurrent_gated_delta_step
from minicpmv.layers.norm import GatedRMSNorm, RMSNorm, ZeroCenteredRMSNorm
from minicpmv.loading import load_model
from test_parity46 import our_prefill_logits
from tiny46 import build_tiny_46


def plain_step(q, k, v, g, beta, state):
    state = state * g.exp()[..., None, None]
    delta = (v - torch.einsum("bhk,bhkv->bhv", k, state)) * beta[..., None]
    state = state + k[..., :, None] * delta[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q, state), state


def test_recurrent_step_matches_the_formula_and_updates_in_place():
    g = torch.Generator().manual_seed(0)
    B, H, dk, dv = 2, 3, 16, 8
    q, k = torch.randn(B, H, dk, generator=g), F.normalize(torch.randn(B, H, dk, generator=g), dim=-1)
    v, beta = torch.randn(B, H, dv, generator=g), torch.rand(B, H, generator=g)
    gate = -torch.rand(B, H, generator=g)
    state = torch.randn(B, H, dk, dv, generator=g)
    expected_o, expected_state = plain_step(q, k, v, gate, beta, state.clone())
    ptr = state.data_ptr()
    o = recurrent_gated_delta_step(q, k, v, gate, beta, state)
    assert state.data_ptr() == ptr
    torch.testing.assert_close(o, expected_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, expected_state, atol=1e-5, rtol=1e-5)
    # a strided state (a view into a larger buffer) takes the general path, same numbers
    big = torch.zeros(B, H, dk, 2 * dv)
    strided = big[..., :dv]
    strided.copy_(torch.randn(B, H, dk, dv, generator=g))
    expected_o, expected_state = plain_step(q, k, v, gate, beta, strided.clone())
    torch.testing.assert_close(recurrent_gated_delta_step(q, k, v, gate, beta, strided), expected_o,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(strided, expected_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 3, 4, 5, 16, 17, 30, 33, 64, 100])
def test_the_prefill_rule_of_any_length_equals_the_token_by_token_recurrence(T):
    g = torch.Generator().manual_seed(T)
    B, H, dk, dv = 1, 4, 32, 16
    q = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1) * dk ** -0.5
    k = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1)
    v, beta = torch.randn(B, H, T, dv, generator=g), torch.rand(B, H, T, generator=g)
    gate = -torch.rand(B, H, T, generator=g)
    state = torch.randn(B, H, dk, dv, generator=g) * 0.1
    before = state.clone()
    o, final = prefill_gated_delta_rule(q, k, v, gate, beta, state)
    assert torch.equal(state, before)  # the caller's state is left alone
    s, outs = state.clone(), []
    for t in range(T):
        step_o, s = plain_step(q[:, :, t], k[:, :, t], v[:, :, t], gate[:, :, t], beta[:, :, t], s)
        outs.append(step_o)
    torch.testing.assert_close(o, torch.stack(outs, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, s, atol=1e-5, rtol=1e-5)


def test_fused_norms_equal_the_plain_ones():
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    for norm, args in ((RMSNorm(64), (x,)), (ZeroCenteredRMSNorm(64), (x,)), (GatedRMSNorm(64), (x, z))):
        with torch.no_grad():
            norm.weight.copy_(0.1 * torch.randn(64, generator=g) + (1.0 if not isinstance(norm, ZeroCenteredRMSNorm)
                                                                    else 0.0))
        plain = norm(*args)
        norm.fused = True
        torch.testing.assert_close(norm(*args), plain, atol=2e-6, rtol=2e-6)
        half = tuple(a.bfloat16() for a in args)  # not the fp32 CPU path: the fused form is not used
        norm.fused = False
        reference = norm.to(torch.bfloat16)(*half)
        norm.fused = True
        assert torch.equal(norm(*half), reference)


def test_tiny46_with_fused_norms_matches_the_fp32_load(tmp_path):
    folder = build_tiny_46(tmp_path, seed=2, dtype=torch.bfloat16)
    exact, _ = load_model(folder, "float32", "cpu", progress=False)
    fast, _ = load_model(folder, "auto", "cpu", progress=False, isa="avx2")
    apply_plan(fast, replace(rule_plan(detect("avx2")), fused_norm=True), None, ())  # norms only
    assert fast.language_model.layers[0].input_layernorm.fused
    ids = list(range(100, 140))
    with torch.inference_mode():
        diff = (our_prefill_logits(fast, ids, []) - our_prefill_logits(exact, ids, [])).abs().max().item()
    assert diff < 2e-4  # measured 1.03e-4 on the AMX Xeon (torch 2.11), below 1e-4 on the Zen 3
