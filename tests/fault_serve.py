"""`minicpmv serve` with a fault injected inside the model (test-only launcher): any prompt chunk
that contains the text FAULT-INJECT raises in the model's embedding step, as a bug or a bad
kernel input would, while every other request runs normally."""
import sys

import torch

import minicpmv
from minicpmv.cli import main

TRIGGER = " FAULT-INJECT"
_load = minicpmv.load


def load(*args, **kwargs):
    model = _load(*args, **kwargs)
    trigger = model.tokenizer.encode(TRIGGER, add_special_tokens=False).ids
    embed = model.model.embed

    def faulty_embed(ids: torch.Tensor, vision):
        flat = ids.tolist()
        if any(flat[i:i + len(trigger)] == trigger for i in range(len(flat) - len(trigger) + 1)):
            raise RuntimeError("injected fault inside the model")
        return embed(ids, vision)

    model.model.embed = faulty_embed
    return model


minicpmv.load = load
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
