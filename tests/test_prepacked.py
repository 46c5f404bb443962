"""The vision matrices held in oneDNN's blocked layout (layers/prepacked.py): the same numbers bit
for bit as the plain bf16 GEMM they replace, one copy of each matrix, a model that still copies
and pickles, and a CPU plan that reorders the vision matrices only (x86 with bf16 vision GEMMs)."""
import copy
import pickle

import pytest
import torch

from minicpmv.cpu.isa import CpuInfo
from minicpmv.cpu.plan import choose, rule_plan
from minicpmv.layers import prepacked
from minicpmv.layers.prepacked import PrepackedBf16Linear
from minicpmv.layers.weight_formats import Bf16Linear
from minicpmv.loading import load_model
from tiny46 import build_tiny_46



def refused_here() -> bool:
    """Where oneDNN cannot reorder bf16 matrices on this CPU (AVX2-only): nothing may be reordered
    and the plan must say so; True when the numeric checks below have nothing to run on."""
    if prepacked.available():
        return False
    assert not choose().prepacks_vision
    return True


def pair(out_f=96, in_f=64, bias=True):
    g = torch.Generator().manual_seed(out_f + in_f)
    w = torch.randn(out_f, in_f, generator=g) * 0.1
    b = torch.randn(out_f, generator=g) if bias else None
    return Bf16Linear.of(w, b), PrepackedBf16Linear.from_bf16(Bf16Linear.of(w, b))


@pytest.mark.parametrize("bias", [True, False])
def test_same_numbers_as_the_plain_bf16_gemm(bias):
    if refused_here():
        return
    plain, packed = pair(bias=bias)
    assert "weight" not in packed._parameters and torch.equal(packed.weight, plain.weight)
    for shape in ((1, 64), (5, 64), (300, 64), (2, 37, 64)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            assert torch.equal(packed.bf16_product(x), plain.bf16_product(x))
            want = torch.nn.functional.linear(x.bfloat16(), plain.weight).float()
            want = want if plain.bias is None else want + plain.bias
            assert torch.equal(packed(x), want)
    assert not packed.on_extension(1)


def test_copies_and_pickles_as_the_plain_matrix():
    if refused_here():
        return
    _, packed = pair()
    x = torch.randn(7, 64)
    for twin in (copy.deepcopy(packed), pickle.loads(pickle.dumps(packed))):
        assert type(twin) is PrepackedBf16Linear and torch.equal(twin(x), packed(x))


def test_the_plan_reorders_only_the_vision_matrices(tmp_path):
    x86 = CpuInfo(arch="x86_64", model="t", flags=frozenset({"avx512f", "amx_bf16", "amx_tile"}), detected="amx",
                  level="amx")
    arm = CpuInfo(arch="aarch64", model="t", flags=frozenset({"bf16"}), detected="neon_bf16", level="neon_bf16")
    assert rule_plan(x86).prepacks_vision == prepacked.available() and not rule_plan(arm).prepacks_vision
    assert ("blocked layout" in dict(rule_plan(x86).rows())["vision GEMMs"]) == prepacked.available()
    model, _ = load_model(build_tiny_46(tmp_path, seed=1, dtype=torch.bfloat16), "auto", "cpu", progress=False)
    names = [n for n, m in model.named_modules() if isinstance(m, PrepackedBf16Linear)]
    if choose().prepacks_vision:
        assert names and all(n.startswith(("vision_tower", "merger")) for n in names)
        assert not any(type(m) is Bf16Linear and not n.startswith("language_model") and n != "lm_head"
                       for n, m in model.named_modules())
    else:
        assert not names
