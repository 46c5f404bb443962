"""Cached parameter-derived tensors (layers/derived.py) follow every way a parameter changes."""
import torch
from torch import nn

from minicpmv.layers.derived import Derived


def test_recomputed_when_the_parameter_changes():
    calls = []
    scale = Derived(lambda w: calls.append(1) or (1.0 + w))
    p = nn.Parameter(torch.zeros(4), requires_grad=False)
    assert torch.equal(scale(p), torch.ones(4)) and torch.equal(scale(p), torch.ones(4))
    assert len(calls) == 1  # cached
    p.copy_(torch.full((4,), 2.0))  # in place
    assert torch.equal(scale(p), torch.full((4,), 3.0))
    p.data = torch.full((4,), 5.0)  # storage swapped
    assert torch.equal(scale(p), torch.full((4,), 6.0))
    q = nn.Parameter(torch.full((4,), 7.0), requires_grad=False)  # another parameter
    assert torch.equal(scale(q), torch.full((4,), 8.0))
    assert len(calls) == 4


def test_a_new_parameter_at_a_freed_address_is_not_mistaken_for_the_old_one():
    scale = Derived(lambda w: 1.0 + w)
    seen, reused = set(), 0
    for i in range(5000):  # until the allocator has handed a freed block back a few times
        p = nn.Parameter(torch.full((8,), float(i)), requires_grad=False)
        reused += p.data_ptr() in seen
        seen.add(p.data_ptr())
        assert torch.equal(scale(p), torch.full((8,), i + 1.0))
        del p
        if reused >= 20:
            break
    assert reused >= 20  # addresses were reused, and every value was still right


def test_value_is_usable_inside_and_outside_inference_mode():
    scale = Derived(lambda w: 1.0 + w)
    p = nn.Parameter(torch.zeros(3))
    with torch.inference_mode():
        v = scale(p)
    assert not v.is_inference() and not v.requires_grad
