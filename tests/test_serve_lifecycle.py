"""`minicpmv serve` starting and stopping as a service manager sees it: the engine loop runs on the
main thread and HTTP on another, so these check the seams of that split. SIGTERM while a stream is
open lets the stream finish, then the process exits 0; a port already taken ends the process with
one error line and a non-zero status instead of an engine left running with no listener."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import httpx

from cli_support import REPO
from test_server_support import MODEL_NAME, ServerProcess


def test_sigterm_lets_the_open_stream_finish_then_exits_0(tiny46_dir, tmp_path):
    log_path = tmp_path / "serve.log"
    server = ServerProcess(tiny46_dir, log_path=log_path, api_key=None)
    try:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Count"}], "max_tokens": 600,
                "ignore_eos": True, "temperature": 0, "stream": True}
        tokens, finish, done = 0, None, False
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content") is not None:
                        tokens += 1
                        if tokens == 1:
                            server.proc.send_signal(signal.SIGTERM)  # mid-stream
                    if chunk["choices"] and chunk["choices"][0].get("finish_reason"):
                        finish = chunk["choices"][0]["finish_reason"]
        assert done and finish == "length", log_path.read_text()
        assert server.proc.wait(timeout=60) == 0, log_path.read_text()
        with socket.socket() as s:  # nothing listens any more
            assert s.connect_ex(("127.0.0.1", server.port)) != 0
    finally:
        server.stop()


def test_a_taken_port_ends_the_process_with_an_error(tiny46_dir, tmp_path):
    log_path = tmp_path / "serve.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "minicpmv", "serve", "--model", str(tiny46_dir),
                                     "--port", str(port), "--dtype", "float32", "--device", "cpu", "--threads", "1"],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            status = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert status != 0, text
    assert "address already in use" in text.lower(), text
    assert "Traceback" not in text, text
