"""`minicpmv serve` as an operator meets it: the start-up banner (whose curl line works as
printed), the model served under its folder's name by default, one access-log line per request
in --log-format json, and Prometheus counters typed as counters."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from cli_support import REPO
from test_server_support import free_port


@pytest.fixture(scope="module")
def server(tiny46_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "MiniCPM-V-tiny"
    shutil.copytree(tiny46_dir, folder)
    log_path = tmp_path_factory.mktemp("logs") / "serve.log"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "minicpmv", "serve", "--model", str(folder), "--port", str(port),
                                 "--dtype", "float32", "--device", "cpu", "--threads", "1", "--log-format", "json"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)
        yield base, log_path, folder
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_records(log_path) -> list[dict]:
    out = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_banner_names_the_model_and_its_curl_line_works(server):
    base, log_path, folder = server
    messages = [r["message"] for r in log_records(log_path) if r["logger"] == "minicpmv.server"]
    text = "\n".join(messages)
    assert f"model: MiniCPM-V-tiny (MiniCPM-V 4.6, {folder})" in text
    assert re.search(r"weights: float32 on cpu; matrices: \d+ float32 matrices", text)
    assert re.search(r"memory: [\d.]+ GiB resident; context 4096 tokens; 32 sequences", text)
    assert f"listening on {base}" in text
    curl = next(m for m in messages if m.startswith("try: curl "))[len("try: "):]
    out = subprocess.run(curl + " -s", shell=True, capture_output=True, text=True, timeout=120)
    reply = json.loads(out.stdout)
    assert reply["model"] == "MiniCPM-V-tiny" and reply["choices"][0]["message"]["content"] is not None


def test_models_lists_the_folder_name(server):
    base, _, _ = server
    assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == ["MiniCPM-V-tiny"]


def test_one_access_line_per_request(server):
    base, log_path, _ = server
    ok = httpx.post(base + "/v1/chat/completions", timeout=120, json={
        "model": "MiniCPM-V-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
        "temperature": 0})
    assert ok.status_code == 200
    completion_id = ok.json()["id"]
    missing = httpx.post(base + "/v1/chat/completions", timeout=60,
                         json={"model": "nope", "messages": [{"role": "user", "content": "Hi"}]})
    assert missing.status_code == 404
    time.sleep(0.5)
    access = [r for r in log_records(log_path) if r["logger"] == "minicpmv.access"]
    line = [r for r in access if r["id"] == completion_id]
    assert len(line) == 1
    assert line[0]["status"] == 200 and line[0]["path"] == "/v1/chat/completions"
    assert line[0]["prompt_tokens"] == ok.json()["usage"]["prompt_tokens"] and line[0]["completion_tokens"] == 3
    assert 0 < line[0]["ttft_ms"] <= line[0]["duration_ms"]
    assert [r["status"] for r in access if r["path"] == "/v1/chat/completions" and r["status"] == 404] == [404]


def test_streamed_request_is_logged_when_the_stream_ends(server):
    base, log_path, _ = server
    body = {"model": "MiniCPM-V-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    time.sleep(0.5)
    line = [r for r in log_records(log_path) if r["logger"] == "minicpmv.access" and r.get("id") == chunks[0]["id"]]
    assert len(line) == 1 and line[0]["status"] == 200 and line[0]["completion_tokens"] == 4
    assert line[0]["ttft_ms"] <= line[0]["duration_ms"]


def test_counters_are_typed_as_counters(server):
    base, _, _ = server
    text = httpx.get(base + "/metrics").text
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert types["minicpmv_encoder_cache_hits_total"] == "counter"
    assert types["minicpmv_encoder_cache_misses_total"] == "counter"
    for name, kind in types.items():
        assert (kind == "counter") == name.endswith("_total"), (name, kind)
