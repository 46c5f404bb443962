"""Helpers for the server tests (no tests here): run a real `minicpmv serve` subprocess on
127.0.0.1 and talk to it with the official openai client, plus small media builders."""
from __future__ import annotations

import base64
import io
import os
import re
import socket
import subprocess
import sys
import time

import av
import httpx
import numpy as np
import openai
from PIL import Image

MODEL_NAME = "tiny"
API_KEY = "sk-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir, *args, log_path=None, api_key=API_KEY, startup_timeout=240,
                 launcher=("-m", "minicpmv.cli")):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [sys.executable, *launcher, "serve", "--model", str(model_dir), "--served-model-name",
               MODEL_NAME, "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--device", "cpu",
               "--threads", "1", "--log-level", "warning", *(["--api-key", api_key] if api_key else []), *args]
        self.log = open(log_path or os.devnull, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} (log: {log_path})")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy in time")

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.api_key or "none", max_retries=0,
                             timeout=kwargs.pop("timeout", 300), **kwargs)

    def post(self, body, headers=None, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json", **(headers or {})}
        content = body if isinstance(body, (bytes, str)) else None
        kwargs.setdefault("timeout", 300)
        return httpx.post(self.base + "/v1/chat/completions", content=content,
                          json=None if content is not None else body, headers=headers, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.base + "/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def wait_idle(self, timeout=30) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["minicpmv_sequences_running"] == 0 and m["minicpmv_sequences_admitted"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout}s: {m}")
            time.sleep(0.1)

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def photo(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3)).astype("uint8"))


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return data_url(buf.getvalue(), "image/png")


def image_part(image: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": image_url(image)}}


def video_bytes(seconds: float = 4, fps: int = 8, width: int = 96, height: int = 64) -> bytes:
    """A small mp4 (mpeg4 codec, always in FFmpeg) of drifting gradients."""
    buf = io.BytesIO()
    container = av.open(buf, "w", format="mp4")
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(int(seconds * fps)):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[..., 0] = (np.arange(width)[None, :] * 3 + i * 9) % 256
        frame[..., 1] = (np.arange(height)[:, None] * 4 + i * 5) % 256
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return buf.getvalue()


def user(*parts) -> list[dict]:
    content = [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]
