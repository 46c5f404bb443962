"""Operator limits on a real `minicpmv serve`: a full queue answers 429 (and recovers), URL
fetching works when allowed and keeps its size limit. The media host is a loopback http.server."""
import functools
import http.server
import threading
import time

import httpx
import openai
import pytest

from test_server_support import MODEL_NAME, ServerProcess, photo, user


@pytest.fixture(scope="module")
def media_host(tmp_path_factory):
    folder = tmp_path_factory.mktemp("www")
    photo(90, 130, 7).save(folder / "small.png")
    photo(200, 200, 8).save(folder / "large.png")  # ~120 kB: over --media-max-mb 0.05
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(tiny46_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    s = ServerProcess(tiny46_dir, "--max-concurrency", "1", "--max-queue", "1", "--allow-url-fetch",
                      "--media-max-mb", "0.05", "--media-fetch-timeout", "5", log_path=log)
    yield s
    s.stop()


def test_a_full_queue_answers_429_and_recovers(server):
    client = server.client(timeout=30)
    body = {"model": MODEL_NAME, "messages": user("Go on and on."), "max_tokens": 3000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, headers=headers, timeout=60) as one, \
            httpx.stream("POST", server.base + "/v1/chat/completions", json=body, headers=headers, timeout=60) as two:
        lines = one.iter_lines()  # keep the iterator: dropping it would close the stream
        next(lines)
        assert one.status_code == two.status_code == 200  # one running, one waiting
        deadline = time.monotonic() + 10
        while server.metrics()["minicpmv_queue_depth"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(openai.RateLimitError, match="server busy"):
            client.chat.completions.create(model=MODEL_NAME, messages=user("me too"), max_tokens=2)
    server.wait_idle()
    reply = client.chat.completions.create(model=MODEL_NAME, messages=user("now?"), max_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_images_by_url_when_fetching_is_allowed(server, media_host):
    client = server.client()
    part = {"type": "image_url", "image_url": {"url": media_host + "/small.png"}}
    reply = client.chat.completions.create(model=MODEL_NAME, messages=user(part, "What is it?"), max_tokens=3)
    assert reply.usage.prompt_tokens > 30  # the image's placeholders are in the prompt
    for url, message in ((media_host + "/large.png", "over the limit"), (media_host + "/missing.png", "HTTP 404")):
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(model=MODEL_NAME, max_tokens=3, messages=user(
                {"type": "image_url", "image_url": {"url": url}}, "What is it?"))
