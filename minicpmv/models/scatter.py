"""The one seam between vision and language: vision features written over placeholder tokens."""
import torch


def scatter_vision(embeds: torch.Tensor, input_ids: torch.Tensor, vision: dict[int, torch.Tensor]) -> torch.Tensor:
    """embeds [T, D] of input_ids [T] -> the same with every position holding placeholder id
    `k` replaced, in order, by the rows of vision[k]; returned as [1, T, D]."""
    for token_id, feats in vision.items():
        where = (input_ids == token_id).nonzero().squeeze(-1)
        if len(where) != len(feats):
            raise ValueError(f"{len(where)} placeholder tokens (id {token_id}) but {len(feats)} vision features")
        embeds[where] = feats.to(embeds.dtype)
    return embeds.unsqueeze(0)
