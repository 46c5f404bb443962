"""The README's shell commands, run verbatim in a sandbox folder where `./MiniCPM-V-4.6` is a tiny
random 4.6 checkpoint and `photo.jpg` a small picture, with no network (HF_HUB_OFFLINE=1).

Each ```bash block runs as a script, in order; a block that needs the network (or is the test
suite itself) carries a `<!-- smoke: skip (reason) -->` line above it, and the `serve` block
(`<!-- smoke: server -->`) is started in the background for the `curl` blocks after it. The one
change made to the text: the example port 8000 becomes a free port, so parallel runs do not clash."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import httpx
import numpy as np
from PIL import Image

from cli_support import REPO
from test_server_support import free_port

BLOCK = re.compile(r"(?:<!-- smoke: ([^>]*?) -->\n)?```bash\n(.*?)```", re.S)


def readme_blocks() -> list[tuple[str | None, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer((REPO / "README.md").read_text())]


def test_every_block_runs_or_says_why_not():
    blocks = readme_blocks()
    assert len(blocks) >= 8
    for mark, body in blocks:
        assert mark is None or mark == "server" or re.fullmatch(r"skip \(.+\)", mark), mark
        needs_network = re.search(r"pip install|^hf |minicpmv download|openbmb/", body, re.M)
        if needs_network:
            assert mark and mark.startswith("skip"), f"this block needs the network but is not marked:\n{body}"


def sandbox(tmp_path, tiny46_dir):
    shutil.copytree(tiny46_dir, tmp_path / "MiniCPM-V-4.6")
    Image.fromarray(np.random.RandomState(3).randint(0, 255, (120, 160, 3)).astype("uint8")).save(
        tmp_path / "photo.jpg")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "minicpmv"  # the console script, pointed at this checkout
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m minicpmv \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    # offline; one torch thread per process, as conftest.py sets for in-process tests
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
            "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def test_readme_commands_run(tmp_path, tiny46_dir):
    env = sandbox(tmp_path, tiny46_dir)
    port = str(free_port())
    server, ran, outputs = None, 0, []
    try:
        for mark, body in readme_blocks():
            start = time.monotonic()
            if mark and mark.startswith("skip"):
                continue
            script = body.replace(":8000", f":{port}").replace("--port 8000", f"--port {port}")
            if mark == "server":
                log = open(tmp_path / "server.log", "w")
                server = subprocess.Popen(["bash", "-c", "exec " + script.strip()], cwd=tmp_path, env=env,
                                          stdout=log, stderr=subprocess.STDOUT)
                wait_healthy(server, port, tmp_path / "server.log")
            else:
                out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                                     capture_output=True, text=True, timeout=600)
                assert out.returncode == 0, f"README block failed:\n{body}\nstdout:\n{out.stdout}\nstderr:\n" \
                                            f"{out.stderr}"
                outputs.append(out.stdout)
            ran += 1
            print(f"{time.monotonic() - start:6.1f} s  {body.splitlines()[0][:80]}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    assert ran >= 5
    # what the commands produced
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["id"] for a in answers) == ["cat", "haiku"] and all("choices" in a for a in answers)
    assert json.loads((tmp_path / "MiniCPM-V-4.6-int4" / "config.json").read_text())["quantization_config"]
    quick = next(o for o in outputs if '"finish_reason"' in o)
    assert set(json.loads(quick.splitlines()[-1])) == {"text", "reasoning", "tool_calls", "usage", "finish_reason"}
    curl = next(o for o in outputs if '"chat.completion"' in o)
    reply, end = json.JSONDecoder().raw_decode(curl)
    assert reply["model"] == "MiniCPM-V-4.6"
    assert [m["id"] for m in json.loads(curl[end:])["data"]] == ["MiniCPM-V-4.6"]


def wait_healthy(proc, port, log_path, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("the README's server did not start")
