"""The `minicpmv` command as a user runs it."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "minicpmv.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_help_explains_the_commands():
    out = run("--help")
    assert out.returncode == 0 and "chat" in out.stdout
    chat = run("chat", "--help")
    assert chat.returncode == 0
    for option in ("--model", "--image", "--video", "--think", "--dtype", "--max-new-tokens", "hub id"):
        assert option in chat.stdout


def test_chat_streams_an_answer_about_an_image(tiny46_dir, tmp_path):
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (300, 500, 3)).astype("uint8")).save(image)
    out = run("chat", "--model", str(tiny46_dir), "--image", str(image), "--greedy", "--max-new-tokens", "6",
              "What is in the picture?")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_without_network_it_says_what_to_pass_instead(tmp_path):
    out = run("chat", "What is it?", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert out.returncode == 2
    assert "openbmb/MiniCPM-V-4.6" in out.stderr and "local folder" in out.stderr


def test_bad_image_path_is_a_clear_error(tiny46_dir, tmp_path):
    out = run("chat", "--model", str(tiny46_dir), "--image", str(tmp_path / "missing.jpg"), "hi")
    assert out.returncode == 2 and "missing.jpg" in out.stderr


def test_display_shows_escaped_newlines_as_line_breaks_unless_raw(capsys):
    from minicpmv.cli import Display

    pieces = [("reasoning", "think\\"), ("reasoning", "nmore"), ("content", "line one\\"), ("content", "nline two "),
              ("content", "`a\\nb` $x\\ny"), ("content", "$ done\\")]
    shown = Display(dim=False, raw=False)
    for kind, text in pieces:
        shown.write(kind, text)
    shown.close()
    out, err = capsys.readouterr()
    assert err == "think\nmore"
    assert out == "line one\nline two `a\\nb` $x\\ny$ done\\\n"
    raw = Display(dim=False, raw=True)
    for kind, text in pieces:
        raw.write(kind, text)
    raw.close()
    out, err = capsys.readouterr()
    assert err == "think\\nmore" and out == "line one\\nline two `a\\nb` $x\\ny$ done\\\n"
