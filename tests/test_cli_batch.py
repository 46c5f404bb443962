"""`minicpmv run`: 50 JSONL requests (2 of them bad) through the engine's batching into JSONL
answers; bad lines become error records; a stopped run resumes without redoing answered ids."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import minicpmv
import minicpmv.cli.batch as batch
import minicpmv.loading
from minicpmv.cli import main


def user(*content):
    return [{"role": "user", "content": list(content)}]


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    image = folder / "cat.png"
    Image.fromarray(np.random.RandomState(2).randint(0, 255, (50, 70, 3)).astype("uint8")).save(image)
    lines = []
    for i in range(50):
        text = {"type": "text", "text": f"Question number {i}: say something about {i * 7 % 13}."}
        if i == 17:
            lines.append('{"id": "q17", "messages": [')  # torn JSON
        elif i == 33:
            lines.append(json.dumps({"id": "q33", "messages": user(
                {"type": "image_url", "image_url": {"url": str(folder / "missing.png")}}, text), "max_tokens": 4}))
        elif i % 10 == 0:
            url = image.as_uri() if i % 20 == 0 else str(image)
            lines.append(json.dumps({"id": f"q{i}", "messages": user(
                {"type": "image_url", "image_url": {"url": url}}, text), "max_tokens": 4, "temperature": 0}))
        elif i % 10 == 5:  # OpenAI batch-file shape
            lines.append(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                     "body": {"model": "x", "messages": user(text), "max_tokens": 3,
                                              "temperature": 0}}))
        else:
            lines.append(json.dumps({"id": f"q{i}", "messages": user(text), "max_tokens": 2 + i % 4,
                                     "temperature": 0}))
    path = folder / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, image


def records(path) -> dict[str, dict]:
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        assert r["id"] not in out, f"{r['id']} answered twice"
        out[r["id"]] = r
    return out


def test_batch_of_50_with_2_bad_lines_then_resume(tiny46_dir, requests_file, tmp_path, capsys, monkeypatch):
    path, image = requests_file
    out = tmp_path / "answers.jsonl"
    argv = ["run", str(path), "--out", str(out), "--model", str(tiny46_dir), "--dtype", "float32", "--device", "cpu",
            "--threads", "1", "--max-concurrency", "8"]
    assert main(argv) == 0
    got = records(out)
    assert len(got) == 50
    errors = {k: r for k, r in got.items() if "error" in r}
    assert sorted(errors) == ["line-18", "q33"]  # the torn line has no readable id: its line number names it
    assert "not valid JSON" in errors["line-18"]["error"] and errors["line-18"]["line"] == 18
    assert "missing.png" in errors["q33"]["error"] and "no such file" in errors["q33"]["error"]
    assert "(2 errors)" in capsys.readouterr().err

    api = minicpmv.load(tiny46_dir, dtype="float32", device="cpu", progress=False)
    for i in range(50):
        if i in (17, 33):
            continue
        r = got[f"q{i}"]
        wanted = 4 if i % 10 == 0 else 3 if i % 10 == 5 else 2 + i % 4
        assert r["usage"]["completion_tokens"] <= wanted and r["choices"][0]["finish_reason"] in ("stop", "length")
    for i in (0, 10, 21, 45):  # batched greedy answers are the one-at-a-time answers
        text = f"Question number {i}: say something about {i * 7 % 13}."
        content = [{"type": "image", "image": str(image)}, text] if i % 10 == 0 else [text]
        ref = api.chat(msgs=[{"role": "user", "content": content}], do_sample=False,
                       max_new_tokens=4 if i % 10 == 0 else 3 if i % 10 == 5 else 2 + i % 4)
        r = got[f"q{i}"]
        assert r["choices"][0]["message"]["content"] == str(ref) and r["usage"] == ref.usage, i

    # resume: drop 5 answers and tear the last line, as a killed run leaves the file
    lines = out.read_text().splitlines()
    kept, dropped = lines[:-6], [json.loads(line)["id"] for line in lines[-6:]]
    out.write_text("\n".join(kept) + "\n" + lines[-6][:25])
    started = []
    real = batch.BatchRunner.run
    monkeypatch.setattr(batch.BatchRunner, "run", lambda self, todo, write: started.extend(r.id for r in todo) or
                        real(self, todo, write))
    assert main(argv) == 0
    assert sorted(started) == sorted(i for i in dropped if i not in errors)
    again = records(out)
    assert sorted(again) == sorted(got)
    assert {k: v.get("usage") for k, v in again.items()} == {k: v.get("usage") for k, v in got.items()}

    # everything answered: the model is not even loaded
    monkeypatch.setattr(minicpmv.loading, "load", lambda *a, **k: pytest.fail("loaded with nothing to do"))
    assert main(argv) == 0
    assert "nothing to run" in capsys.readouterr().err
