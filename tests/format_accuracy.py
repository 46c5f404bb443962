"""Accuracy of a fast CPU format against the exact fp32 load of the same checkpoint: the fp32
model decodes greedily; the other model is fed the same tokens one at a time (its decode
kernels, as in generation) and we count the steps where its top-1 token agrees, and the largest
logit difference. Test-only helper (tests/test_weight_formats.py, tests/test_cpu_bf16_path.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpmv.engine.engine import Engine
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence
from minicpmv.state import SingleSequence


@dataclass
class Accuracy:
    steps: int
    top1_agreement: float   # share of steps whose argmax equals the fp32 model's greedy token
    max_logit_error: float  # max |logit - fp32 logit| over every step and vocabulary entry
    logit_scale: float      # max |fp32 logit|, for scale

    def __str__(self):
        return (f"top-1 agreement {self.top1_agreement:.3f} over {self.steps} steps, max |logit error| "
                f"{self.max_logit_error:.3g} (fp32 logits up to {self.logit_scale:.3g})")


def greedy(model, prompt: list[int], n: int) -> list[int]:
    engine = Engine(model, max_context=4096)
    seq = engine.add(Sequence(list(prompt), SamplingParams(max_new_tokens=n, do_sample=False), []))
    while engine.has_work():
        engine.step()
    return seq.output_ids


@torch.inference_mode()
def forced_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), V] of each step when `tokens` are fed back one at a time."""
    state = SingleSequence.for_model(model, len(prompt) + len(tokens))
    hidden = model(model.embed(torch.tensor(prompt), {}), state.batch(len(prompt)))
    out = [model.logits(hidden[0, -1])]
    for t in tokens[:-1]:
        hidden = model(model.embed(torch.tensor([t]), {}), state.batch(1))
        out.append(model.logits(hidden[0, -1]))
    return torch.stack(out)


def first_step_error(reference, model, prompt: list[int]) -> float:
    """max |logit - reference logit| of the first generated position, relative to the reference's
    largest logit."""
    a, b = forced_logits(reference, prompt, [0])[0], forced_logits(model, prompt, [0])[0]
    return ((a - b).abs().max() / a.abs().max()).item()


def accuracy(reference, model, prompt: list[int], n: int) -> Accuracy:
    tokens = greedy(reference, prompt, n)
    ref = forced_logits(reference, prompt, tokens)
    got = forced_logits(model, prompt, tokens)
    agree = (got.argmax(-1) == torch.tensor(tokens)).float().mean().item()
    return Accuracy(len(tokens), agree, (got - ref).abs().max().item(), ref.abs().max().item())
