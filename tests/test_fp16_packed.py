"""fbgemm fp16-packed linears (layers/fp16_packed.py): fp32 math on the fp16-rounded weight."""
import torch
import torch.nn.functional as F
from torch import nn

from minicpmv.layers.fp16_packed import PackedFP16Linear, pack_fp16


def test_product_is_fp32_math_on_the_fp16_weight():
    torch.manual_seed(0)
    w, b = torch.randn(300, 64).bfloat16(), torch.randn(300)
    lin = PackedFP16Linear(w, b)
    for shape in [(64,), (1, 64), (3, 64), (2, 5, 64), (700, 64)]:
        x = torch.randn(*shape)
        expected = F.linear(x.double(), w.double(), b.double())  # bf16 values are exact in fp16
        got = lin(x)
        assert got.dtype == torch.float32 and got.shape == (*shape[:-1], 300)
        # fp32 accumulation error only; a weight rounded to fewer bits would be off by ~1e-3
        assert (got.double() - expected).abs().max() < 3e-6 * expected.abs().max()


def test_tall_matrices_are_packed_in_row_blocks(monkeypatch):
    from minicpmv.layers import fp16_packed

    monkeypatch.setattr(fp16_packed, "STAGING_BYTES", 64 * 4 * 70)  # 70 rows per block: 5 blocks
    w, b = torch.randn(300, 64).bfloat16(), torch.randn(300)
    lin = PackedFP16Linear(w, b)
    assert len(lin.blocks) == 5
    x = torch.randn(2, 3, 64)
    assert (lin(x).double() - F.linear(x.double(), w.double(), b.double())).abs().max() < 1e-4


def test_pack_swaps_only_matching_half_precision_linears():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4)))
    model[0].weight.data = model[0].weight.data.bfloat16()
    model[1][0].weight.data = model[1][0].weight.data.bfloat16()
    model[1][1].weight.data = torch.full((4, 4), 1e6).bfloat16()  # beyond fp16's range: stays as is
    assert pack_fp16(model, ("1.",)) == 1
    assert isinstance(model[1][0], PackedFP16Linear)
    assert type(model[0]) is nn.Linear and type(model[1][1]) is nn.Linear
