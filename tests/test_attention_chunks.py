"""A prompt chunk after cached context attends without a mask (layers/attention.py
chunk_after_context): equal to one masked attention call over context + chunk."""
import pytest
import torch
import torch.nn.functional as F

from minicpmv.layers.attention import chunk_after_context


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("context, T", [(1, 2), (5, 7), (300, 64), (1000, 33)])
def test_a_chunk_after_context_equals_the_masked_call(dtype, tol, context, T):
    g = torch.Generator().manual_seed(context + T)
    H, Hkv, D = 8, 2, 32
    q = torch.randn(1, H, T, D, generator=g).to(dtype)
    keys = torch.randn(1, Hkv, context + T, D, generator=g).to(dtype)
    values = torch.randn(1, Hkv, context + T, D, generator=g).to(dtype)
    visible = torch.arange(context + T)[None, :] <= (context + torch.arange(T))[:, None]
    expected = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=visible[None, None],
                                              enable_gqa=True, scale=D ** -0.5)
    got = chunk_after_context(q, keys[:, :, context:], values[:, :, context:], keys[:, :, :context],
                              values[:, :, :context], D ** -0.5)
    assert got.dtype == dtype and got.shape == (1, H, T, D)
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)
