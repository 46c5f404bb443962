"""`minicpmv chat` one-shot on a tiny random 4.6 checkpoint: the prompt from an argument, stdin or
a file, --json, the notes that say why an answer stopped, and warnings for cut 4.5 prompts."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

import minicpmv
from cli_support import MODEL_45
from minicpmv.cli import main


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "photo.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (60, 90, 3)).astype("uint8")).save(path)
    return path


@pytest.fixture(scope="module")
def api(tiny46_dir):
    return minicpmv.load(tiny46_dir, dtype="float32", device="cpu", progress=False)


def chat_json(capsys, *argv) -> dict:
    assert main(["chat", "--quiet", "--json", "--threads", "1", *map(str, argv)]) == 0
    out = capsys.readouterr()
    return json.loads(out.out)


def test_json_matches_the_python_api(capsys, tiny46_dir, photo, api):
    got = chat_json(capsys, "--model", tiny46_dir, "--image", photo, "--greedy", "--max-new-tokens", "5",
                    "What is in the picture?")
    ref = api.chat(msgs=[{"role": "user", "content": [{"type": "image", "image": str(photo)},
                                                      "What is in the picture?"]}],
                   do_sample=False, max_new_tokens=5, enable_thinking=False)
    assert got == {"text": str(ref), "reasoning": ref.reasoning, "tool_calls": [], "usage": ref.usage,
                   "finish_reason": ref.finish_reason}
    assert got["usage"]["completion_tokens"] == 5 and got["finish_reason"] == "length"


def test_file_url_works_in_the_python_api(api, photo):
    msgs = lambda src: [{"role": "user", "content": [{"type": "image", "image": src}, "Describe."]}]  # noqa: E731
    by_url = api.chat(msgs=msgs(photo.as_uri()), do_sample=False, max_new_tokens=3)
    by_path = api.chat(msgs=msgs(str(photo)), do_sample=False, max_new_tokens=3)
    assert str(by_url) == str(by_path)
    assert by_url.usage["prompt_tokens"] == by_path.usage["prompt_tokens"]


def test_prompt_from_stdin_and_from_a_file(capsys, monkeypatch, tiny46_dir, tmp_path):
    question = "Name three colours.\nOne per line."
    (tmp_path / "q.txt").write_text(question)
    from_file = chat_json(capsys, "--model", tiny46_dir, "--greedy", "--max-new-tokens", "3", f"@{tmp_path / 'q.txt'}")
    monkeypatch.setattr("sys.stdin", io.StringIO(question + "\n"))
    from_stdin = chat_json(capsys, "--model", tiny46_dir, "--greedy", "--max-new-tokens", "3", "-")
    inline = chat_json(capsys, "--model", tiny46_dir, "--greedy", "--max-new-tokens", "3", question)
    assert from_file == from_stdin == inline


def test_streamed_answer_says_it_was_cut(capsys, tiny46_dir):
    assert main(["chat", "--quiet", "--model", str(tiny46_dir), "--greedy", "--max-new-tokens", "4", "--top-k", "5",
                 "--repetition-penalty", "1.2", "Hello"]) == 0
    out = capsys.readouterr()
    assert out.out.strip()
    assert "cut at --max-new-tokens 4 (finish_reason: length)" in out.err


def test_thinking_that_runs_out_of_budget_says_so(capsys, tiny46_dir):
    assert main(["chat", "--quiet", "--model", str(tiny46_dir), "--think", "--greedy", "--max-new-tokens", "4",
                 "Why?"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == ""  # no answer: the 4 tokens all went to thinking
    assert "still thinking when it reached --max-new-tokens 4" in out.err


def test_long_45_prompt_is_cut_with_a_warning(monkeypatch):
    from argparse import Namespace

    from minicpmv.cli.generate import prepare

    model = minicpmv.load(MODEL_45, dtype="float32", device="cpu", progress=False)
    args = Namespace(system=None, max_new_tokens=8, max_slice_nums=None, downsample_mode=None, max_frames=None,
                     stack_frames=None, fps=None, max_inp_length=300)
    err = io.StringIO()
    prepared = prepare(model, [{"role": "user", "content": "word " * 400}], args, False, err)
    assert len(prepared.input_ids) == 300
    assert err.getvalue().startswith("warning: the prompt is ") and "only its first 300 are kept" in err.getvalue()
    args.max_inp_length = None
    err = io.StringIO()
    prepare(model, [{"role": "user", "content": "word " * 400}], args, False, err)
    assert err.getvalue() == ""  # under 4.5's default of 16384: nothing cut, nothing said


def test_hub_id_reads_config_then_downloads_then_loads(capsys, monkeypatch, tiny46_dir):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, revision=None: calls.append(
        ("config", repo)) or str(tiny46_dir / filename))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, revision=None, allow_patterns=None:
                        calls.append(("snapshot", repo_id)) or str(tiny46_dir))
    got = chat_json(capsys, "--model", "openbmb/MiniCPM-V-4.6", "--greedy", "--max-new-tokens", "2", "Hi")
    assert calls == [("config", "openbmb/MiniCPM-V-4.6"), ("snapshot", "openbmb/MiniCPM-V-4.6")]
    assert got["usage"]["completion_tokens"] == 2


def test_video_flags_reach_the_frame_sampler(capsys, tiny46_dir, tmp_path):
    from test_server_support import video_bytes

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(video_bytes(seconds=4, fps=8))

    def prompt_tokens(*flags):
        got = chat_json(capsys, "--model", tiny46_dir, "--video", clip, "--greedy", "--max-new-tokens", "1", *flags,
                        "What happens?")
        return got["usage"]["prompt_tokens"]

    one_fps, two_fps = prompt_tokens("--fps", "1"), prompt_tokens("--fps", "2")
    assert two_fps > one_fps  # twice the frames sampled
    assert prompt_tokens("--fps", "2", "--max-frames", "2") < two_fps  # capped


def test_weights_and_isa_flags_reach_the_load(capsys, monkeypatch, tiny46_dir, photo):
    seen, load = [], minicpmv.load
    monkeypatch.setattr(minicpmv, "load", lambda *a, **kw: seen.append(kw) or load(*a, **kw))
    got = chat_json(capsys, "--model", tiny46_dir, "--dtype", "bfloat16", "--weights", "int8", "--isa", "avx2",
                    "--image", photo, "--greedy", "--max-new-tokens", "5", "What is in the picture?")
    assert seen[0]["weights"] == "int8" and seen[0]["isa"] == "avx2"
    ref = load(tiny46_dir, dtype="bfloat16", device="cpu", progress=False, weights="int8", isa="avx2").chat(
        msgs=[{"role": "user", "content": [{"type": "image", "image": str(photo)}, "What is in the picture?"]}],
        do_sample=False, max_new_tokens=5, enable_thinking=False)
    assert got["text"] == str(ref)


def test_an_unknown_isa_is_one_line_before_loading(capsys, tiny46_dir):
    assert main(["chat", "--quiet", "--model", str(tiny46_dir), "--isa", "sse9", "Hi"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: --isa: CPU ISA level 'sse9'") and "expected one of" in err, err
