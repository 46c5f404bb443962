"""Half-precision matrices with fp32 compute (layers/mixed.py): each path equals its definition."""
import torch
import torch.nn.functional as F

from minicpmv.layers import mixed, scratch
from minicpmv.layers.mixed import MixedLinear


def make(n_out, n_in, bias=True):
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    lin.__class__ = MixedLinear
    lin.weight.data = lin.weight.data.bfloat16()
    return lin


def test_many_rows_use_the_exact_fp32_product_of_the_stored_weight(monkeypatch):
    lin = make(1000, 64)
    x = torch.randn(3, 7, 64)
    expected = F.linear(x, lin.weight.float(), lin.bias)
    assert torch.equal(lin(x), expected)
    monkeypatch.setattr(mixed, "UPCAST_CHUNK_BYTES", 64 * 4 * 96)  # 96 rows of W at a time: 11 chunks
    assert torch.allclose(lin(x), expected, atol=1e-6, rtol=0)


def test_few_rows_use_the_half_precision_product():
    lin = make(300, 64, bias=False)
    x = torch.randn(2, 64)
    assert torch.equal(lin(x), F.linear(x.bfloat16(), lin.weight).float())
    assert lin(x).dtype == torch.float32


def test_the_reused_buffer_works_inside_and_outside_inference_mode(monkeypatch):
    monkeypatch.setattr(scratch, "_buffers", {})  # first use under inference_mode allocates it
    lin = make(1000, 64)
    x = torch.randn(3, 7, 64)
    expected = F.linear(x, lin.weight.float(), lin.bias)
    with torch.inference_mode():
        assert torch.equal(lin(x), expected)
    with torch.no_grad():
        assert torch.equal(lin(x), expected)
