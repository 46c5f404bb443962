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
    runner = model.engine.runner
    embed, prefill, mixed = model.model.embed, runner.prefill, runner.mixed
    armed = [False]

    def triggered(seq) -> bool:
        ids = seq.prompt_ids
        return any(ids[i:i + len(trigger)] == trigger for i in range(len(ids) - len(trigger) + 1))

    def faulty_prefill(seq, n, keep=None):
        armed[0] = triggered(seq)
        try:
            return prefill(seq, n, keep)
        finally:
            armed[0] = False

    def faulty_mixed(chunks, decodes):  # a step's chunks of several requests in one call
        armed[0] = any(triggered(seq) for seq, _, _ in chunks)
        try:
            return mixed(chunks, decodes)
        finally:
            armed[0] = False

    def faulty_embed(ids, vision):
        if armed[0]:
            raise RuntimeError("injected fault inside the model")
        return embed(ids, vision)

    model.model.embed = faulty_embed
    runner.prefill, runner.mixed = faulty_prefill, faulty_mixed
    return model


minicpmv.load = load
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
