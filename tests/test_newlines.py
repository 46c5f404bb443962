"""Escaped newlines for display (minicpmv/newlines.py): one case per protected form, shared with
the web page's JavaScript twin (tests/test_web_chat.py runs the same file in the browser), and
the streaming form agreeing with the one-shot form however the text is cut."""
import json
import random
from pathlib import Path

import pytest

from minicpmv.cli.display import Display
from minicpmv.newlines import NewlineUnescaper, unescape_newlines

CASES = json.loads((Path(__file__).parent / "data" / "newline_cases.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(case):
    assert unescape_newlines(case["input"]) == case["expected"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_stream_cut_anywhere_matches_one_shot(case):
    text = case["input"]
    for cut in range(len(text) + 1):
        stream = NewlineUnescaper()
        assert stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.flush() == case["expected"]
    stream = NewlineUnescaper()
    assert "".join(stream.feed(ch) for ch in text) + stream.flush() == case["expected"]


def test_stream_releases_decided_text_early():
    stream = NewlineUnescaper()
    assert stream.feed("one\\ntwo ") == "one\ntwo "
    assert stream.feed("$x") == ""  # may be math until the closing $ (or the end) arrives
    assert stream.feed("\\ny$ z\\") == "$x\\ny$ z"  # the trailing backslash waits for its partner
    assert stream.feed("n") == "\n"
    assert stream.flush() == ""


def test_random_text_streams_like_one_shot():
    rng = random.Random(0)
    alphabet = ["\\", "n", "\\n", "`", "```", "~~~", "$", "$$", "\\(", "\\)", "\\[", "\\]", "\n", " ", "a", "5"]
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        whole = unescape_newlines(text)
        stream, out, i = NewlineUnescaper(), [], 0
        while i < len(text):
            j = i + rng.randint(1, 4)
            out.append(stream.feed(text[i:j]))
            i = j
        assert "".join(out) + stream.flush() == whole, repr(text)
        # the only change is two characters (backslash, n) becoming one newline
        assert whole.count("\n") - text.count("\n") == len(text) - len(whole), repr(text)


def test_terminal_display_shows_escaped_newlines_as_line_breaks_unless_raw():
    import io

    pieces = [("reasoning", "think\\"), ("reasoning", "nmore"), ("content", "line one\\"), ("content", "nline two "),
              ("content", "`a\\nb` $x\\ny"), ("content", "$ done\\")]
    for raw, answer, thinking in [(False, "line one\nline two `a\\nb` $x\\ny$ done\\\n", "think\nmore\n"),
                                  (True, "line one\\nline two `a\\nb` $x\\ny$ done\\\n", "think\\nmore\n")]:
        out, err = io.StringIO(), io.StringIO()
        shown = Display(out, err, dim=False, raw=raw)
        for kind, text in pieces:
            shown.write(kind, text)
        shown.close()
        assert out.getvalue() == answer and err.getvalue() == thinking
