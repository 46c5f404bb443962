"""`minicpmv serve` with a fault injected inside the model (test-only launcher): while a prompt
chunk of any request whose prompt contains the text FAULT-INJECT runs, the model's embedding step
raises, as a bug or a bad kernel input would; every other request runs normally (even when its
chunks share a step with the faulty one)."""
import sys

import minicpmv
from minicpmv.cli import main

TRIGGER = " FAULT-INJECT"
_load = minicpmv.load


def load(*args, **kwargs):
    model = _load(*args, **kwargs)
    trigger = model.tokenizer.encode(TRIGGER, add_special_tokens=False).ids
    embed, prefill = model.model.embed, model.engine.runner.prefill
    armed = [False]

    def faulty_prefill(seq, n, keep=None):
        ids = seq.prompt_ids
        armed[0] = any(ids[i:i + len(trigger)] == trigger for i in range(len(ids) - len(trigger) + 1))
        try:
            return prefill(seq, n, keep)
        finally:
            armed[0] = False

    def faulty_embed(ids, vision):
        if armed[0]:
            raise RuntimeError("injected fault inside the model")
        return embed(ids, vision)

    model.model.embed = faulty_embed
    model.engine.runner.prefill = faulty_prefill
    return model


minicpmv.load = load
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
