"""IncrementalDetokenizer: streamed text equals the full decode wherever that is complete, never splits a char."""

import pytest
from tokenizers import Tokenizer

from minicpmv.prompt import IncrementalDetokenizer
import paths

V46 = str(paths.FIXTURE_46 / "tokenizer.json")
GOLDEN = str(paths.GOLDEN)

TEXTS = {
    "chinese": "你好，世界！今天天气很好，我们去公园散步吧。",
    "emoji": "👨‍👩‍👧‍👦 family 🎉🇨🇳 ok 👍🏽",
    "mixed": "MiniCPM-V 4.6 说：“图像里有一只🐱。” Ünïcödé café – naïve ∑x² ≤ 10\n\tend",
}


@pytest.fixture(scope="module")
def tokenizers():
    return {
        "4.6": Tokenizer.from_file(V46),
        # Tiny byte-level BPEs trained on English: CJK and emoji come out as raw bytes, split mid-character.
        "4.5": Tokenizer.from_file(f"{GOLDEN}/minicpm-v-4.5/model/tokenizer.json"),
        "4.0": Tokenizer.from_file(f"{GOLDEN}/minicpm-v-4.0/model/tokenizer.json"),
    }


def _byte_tokens(tok, text):
    # Force one token per UTF-8 byte via the GPT-2 byte->unicode table, so every multi-byte char is split.
    table = {}
    n = 0
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return [tok.token_to_id(table[b]) for b in text.encode()]


def _check_stream(tok, ids, skip=True):
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    streamed = ""
    held = 0
    for i, token_id in enumerate(ids):
        delta = det.add(token_id)
        assert "\ufffd" not in delta or "\ufffd" in tok.decode(ids, skip_special_tokens=skip)
        streamed += delta
        full = tok.decode(ids[: i + 1], skip_special_tokens=skip)
        if full.endswith("\ufffd"):
            held += 1
            assert full.startswith(streamed) and len(streamed) < len(full)
        else:
            assert streamed == full
    streamed += det.flush()
    assert streamed == tok.decode(ids, skip_special_tokens=skip)
    return held


@pytest.mark.parametrize("name", TEXTS)
@pytest.mark.parametrize("version", ["4.6", "4.5", "4.0"])
def test_stream_matches_full_decode(tokenizers, version, name):
    tok = tokenizers[version]
    _check_stream(tok, tok.encode(TEXTS[name], add_special_tokens=False).ids)


@pytest.mark.parametrize("name", TEXTS)
def test_every_character_split_into_bytes(tokenizers, name):
    tok = tokenizers["4.6"]
    held = _check_stream(tok, _byte_tokens(tok, TEXTS[name]))
    assert held > 0  # the hold-back path was exercised


def test_special_tokens_skipped_or_kept(tokenizers):
    tok = tokenizers["4.6"]
    im_end = tok.token_to_id("<|im_end|>")
    ids = tok.encode("你好", add_special_tokens=False).ids + [im_end] + _byte_tokens(tok, "🎉 bye")
    _check_stream(tok, ids, skip=True)
    _check_stream(tok, ids, skip=False)
    assert "<|im_end|>" not in _stream_all(tok, ids, True) and "<|im_end|>" in _stream_all(tok, ids, False)


def _stream_all(tok, ids, skip):
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    return "".join(det.add(i) for i in ids) + det.flush()


def test_invalid_bytes_are_released(tokenizers):
    tok = tokenizers["4.6"]
    lone = _byte_tokens(tok, "é")[1:]  # a continuation byte with no lead byte: never a character
    ids = tok.encode("a", add_special_tokens=False).ids + lone * 3 + tok.encode("b", add_special_tokens=False).ids
    _check_stream(tok, ids)
    truncated = _byte_tokens(tok, "x中")[:-1]  # generation stopped mid-character: flush gives what decode gives
    det = IncrementalDetokenizer(tok)
    assert "".join(det.add(i) for i in truncated) == "x"
    assert det.flush() == tok.decode(truncated)[1:]


class _CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_cost_per_token_does_not_grow(tokenizers):
    counting = _CountingTokenizer(tokenizers["4.6"])
    ids = counting.tok.encode(" ".join(TEXTS.values()) * 40, add_special_tokens=False).ids
    det = IncrementalDetokenizer(counting)
    out = "".join(det.add(i) for i in ids) + det.flush()
    assert out == counting.tok.decode(ids)
    assert len(ids) > 1000 and max(counting.lengths) <= 8 and len(counting.lengths) <= 2 * len(ids) + 1
