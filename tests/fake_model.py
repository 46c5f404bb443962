"""A deterministic stand-in for a text model, small enough for exhaustive scheduler tests.

It declares one attention layer and one DeltaNet-like layer and really keeps its state in the
engine's pool: the attention layer stores each token's value as its key and sums every visible
key; the recurrent layer keeps a running sum in its slot. The next token is a function of both
sums and the position, so a wrong block, a stale slot or a wrong position changes the output."""
from __future__ import annotations

import torch
from torch import nn

from minicpmv.state import AttentionSpec, LinearSpec

VOCAB = 97
PLACEHOLDER = 96  # the fake vision placeholder token


class FakeModel(nn.Module):
    mixed_default = True  # tests flip it to run the engine both ways

    def __init__(self, fail_on_token: int | None = None, fail_in: str = "any", mixed: bool | None = None):
        super().__init__()
        # a step's prompt chunks and decode tokens in one call, or one call each
        self.takes_mixed_batches = self.mixed_default if mixed is None else mixed
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.fail_on_token = fail_on_token
        self.fail_in = fail_in  # "any" | "decode" | "prefill"
        self.encode_calls = 0

    dtype = torch.float64

    def state_spec(self):
        return [AttentionSpec(1, 1), LinearSpec(conv_dim=1, conv_kernel=2, num_heads=1, key_dim=1, value_dim=1)]

    def vision_chunks(self, v, max_patches):
        """One unit per crop when the budget is below a crop's size (each crop = 1 'patch' here)."""
        import dataclasses
        n = v.pixel_values.shape[0]
        if max_patches >= n:
            return [v]
        return [dataclasses.replace(v, pixel_values=v.pixel_values[i:i + max_patches],
                                    target_sizes=v.target_sizes[i:i + max_patches]) for i in range(0, n, max_patches)]

    def encode_vision(self, pixel_values, target_sizes, downsample_mode=None):
        self.encode_calls += 1
        return pixel_values.to(torch.float64).reshape(-1, 1)  # one feature (a number) per placeholder

    def embed(self, ids, vision):
        x = ids.to(torch.float64).clone()
        for token_id, feats in vision.items():
            where = (ids == token_id).nonzero().squeeze(-1)
            assert len(where) == len(feats), (len(where), len(feats))
            x[where] = feats[:, 0]
        self.last_ids = ids
        return x.reshape(1, -1, 1)

    def forward(self, x, batch):
        return batch.per_part(self.forward_part, x)

    def forward_part(self, batch, x):
        B, T, _ = x.shape
        phase = "decode" if T == 1 and B >= 1 and batch.context_lens[0] > 0 else "prefill"
        if self.fail_on_token is not None and self.fail_in in ("any", phase):
            if bool((x[..., 0] == self.fail_on_token).any()):
                raise RuntimeError(f"injected fault on token {self.fail_on_token}")
        vals = x[..., 0]
        keys = batch.pool.keys[0]
        keys.index_copy_(0, batch.write_rows, vals.reshape(-1, 1, 1).to(keys.dtype))
        kv = keys[batch.read_rows][..., 0, 0]  # [B, L]
        ctx = torch.tensor(batch.context_lens)
        visible = torch.arange(kv.shape[1])[None, None, :] <= (ctx[:, None, None] + torch.arange(T)[None, :, None])
        sums = (kv[:, None, :] * visible).sum(-1)  # [B, T]
        batch.store_conv(1, batch.conv_state(1))
        running = torch.empty(B, T, dtype=torch.float64)
        for rows, state in batch.recurrent_views(1):  # the running sum lives in each sequence's slot
            running[rows] = state[:, 0, 0, 0][:, None].to(torch.float64) + vals[rows].cumsum(-1)
            if batch.keep is not None:  # the state after the first j tokens, as a DeltaNet layer keeps it
                j = batch.keep[0]
                mid = state[0].clone()
                mid[0, 0, 0] = running[0, j - 1].to(state.dtype)
                batch.keep_linear(1, batch.conv_state(1)[0], mid)
            state[:, 0, 0, 0] = running[rows, -1].to(state.dtype)
        pos = batch.positions.reshape(B, T).to(torch.float64)
        return torch.stack([sums, running, pos], -1)

    def logits(self, hidden):
        s, r, p = hidden.unbind(-1)
        token = (3 * s + 7 * r + p).remainder(VOCAB - 1).long()  # never the placeholder
        return torch.nn.functional.one_hot(token, VOCAB).to(torch.float32)


def reference_tokens(prompt_values: list[float], n: int) -> list[int]:
    """What FakeModel must generate for a prompt (token values after vision substitution)."""
    vals, out = list(prompt_values), []
    for _ in range(n):
        s = sum(vals)
        token = int((3 * s + 7 * s + (len(vals) - 1)) % (VOCAB - 1))
        out.append(token)
        vals.append(token)
    return out
