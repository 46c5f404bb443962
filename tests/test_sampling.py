"""The batched sampler's greedy pick (first_max) and when it reads the rows' seen tokens."""
import pytest
import torch

from minicpmv.engine.sampling import PEAK_CHUNK, SamplingParams, first_max, sample_rows

V = 248094  # Qwen3.5's vocabulary: not a multiple of the chunk, so a short last span


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_first_max_is_argmax(rows):
    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, V, generator=g)
    assert first_max(logits) == logits.argmax(-1).tolist()


def test_first_max_takes_the_first_of_equal_maxima():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    top = logits.max() + 1
    logits[0, [7, 3 * PEAK_CHUNK + 5]] = top  # two spans: the earlier span's index
    logits[1, [PEAK_CHUNK + 9, PEAK_CHUNK + 2]] = top  # one span: the earlier index inside it
    logits[2, [V - 1, V - 2]] = top  # both in the short last span
    logits[3, [V - 1, 11]] = top  # the last span against the first
    assert first_max(logits) == [7, PEAK_CHUNK + 2, V - 2, 11] == logits.argmax(-1).tolist()


def test_first_max_treats_nan_as_argmax_does():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(1))
    logits[0, 5 * PEAK_CHUNK + 17] = float("nan")
    logits[1, [V - 3, 2 * PEAK_CHUNK]] = float("nan")
    assert first_max(logits) == logits.argmax(-1).tolist() == [5 * PEAK_CHUNK + 17, 2 * PEAK_CHUNK]


def test_first_max_on_a_small_vocabulary_and_a_strided_view():
    small = torch.randn(3, 100)
    assert first_max(small) == small.argmax(-1).tolist()
    wide = torch.randn(2, V + 64)
    view = wide[:, :V]  # an int4 lm_head's padded output, sliced: not contiguous
    assert first_max(view) == view.argmax(-1).tolist()
    rows = torch.randn(3, V)
    assert first_max(rows[1:2]) == rows[1:2].argmax(-1).tolist()  # a row of a batch: offset storage


def test_greedy_and_sampled_rows_together():
    logits = torch.full((3, 6), -10.0)
    logits[:, 4] = 10.0
    logits[1, 2] = 10.5
    params = [SamplingParams(), SamplingParams(do_sample=True, top_k=1), SamplingParams()]
    out = sample_rows(logits.clone(), params, [[]] * 3, [[]] * 3, [None] * 3)
    assert out == [4, 2, 4]


def test_seen_tokens_are_read_only_for_a_repetition_penalty():
    calls = []

    def seen():
        calls.append(1)
        return [[4]]

    logits = torch.tensor([[1.0, 0.0, 0.0, 0.0, 2.0]])
    assert sample_rows(logits.clone(), [SamplingParams()], seen, [[]], [None]) == [4]
    assert calls == []
    # 2.0 / 2.5 = 0.8 < 1.0: the penalised token loses its place
    assert sample_rows(logits.clone(), [SamplingParams(repetition_penalty=2.5)], seen, [[]], [None]) == [0]
    assert calls == [1]
    # presence / frequency penalties count the output, not the seen tokens
    assert sample_rows(logits.clone(), [SamplingParams(presence_penalty=1.5)], seen, [[4]], [None]) == [0]
    assert calls == [1]
