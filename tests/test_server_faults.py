"""The engine thread survives what users and bugs throw at it: a fault inside the model for one
request, a request cancelled in the middle of its prefill, clients that leave while queued, 64
streaming clients with images of which some hang up. Every other stream finishes with the same
text as when it runs alone, and the server serves normally afterwards with its memory back."""
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from fault_serve import TRIGGER
from test_server_support import MODEL_NAME, ServerProcess, image_part, photo, user

LAUNCHER = (str(Path(__file__).with_name("fault_serve.py")),)


@pytest.fixture(scope="module")
def server(tiny46_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    s = ServerProcess(tiny46_dir, "--max-concurrency", "16", "--max-queue", "96", "--max-num-batched-tokens", "32",
                      log_path=log, launcher=LAUNCHER)
    yield s
    s.stop()


def prompt(i: int) -> list[dict]:
    if i % 2 == 0:
        return user(image_part(photo(60 + 7 * i, 90 + 3 * i, 200 + i)), f"Picture {i}: what is it?")
    return user(f"Say something about number {i}. " * (1 + i % 3))


def stream(server, messages, max_tokens=12, hang_up_after=None) -> tuple[str, str | None]:
    """(content, error or None); hang_up_after=k closes the connection after k data chunks."""
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    text, seen = [], 0
    try:
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, headers=headers,
                          timeout=180) as r:
            if r.status_code != 200:
                return "", f"HTTP {r.status_code}: {r.read().decode()}"
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return "".join(text), chunk["error"]["message"]
                seen += 1
                if hang_up_after is not None and seen >= hang_up_after:
                    return "".join(text), "hung up"
                for c in chunk["choices"]:
                    text.append(c["delta"].get("content") or "")
    except httpx.HTTPError as e:
        return "".join(text), repr(e)
    return "".join(text), None


@pytest.fixture(scope="module")
def solo(server):
    return [stream(server, prompt(i))[0] for i in range(16)]


def test_a_fault_inside_the_model_fails_only_its_request(server, solo):
    bad = user(f"Please answer this:{TRIGGER} now")
    with ThreadPoolExecutor(9) as pool:
        good = pool.map(lambda i: stream(server, prompt(i)), range(8))
        failed = pool.submit(stream, server, bad)
        good = list(good)
    assert [g for g in good] == [(solo[i], None) for i in range(8)]
    text, error = failed.result()
    assert error is not None and "injected fault inside the model" in error and "Traceback" not in error
    r = server.post({"model": MODEL_NAME, "messages": bad, "max_tokens": 4})
    assert r.status_code == 500
    assert r.json()["error"]["message"].startswith("generation failed: RuntimeError: injected fault")
    assert httpx.get(server.base + "/health").status_code == 200
    assert stream(server, prompt(3)) == (solo[3], None)
    assert server.wait_idle()["minicpmv_failed_sequences_total"] >= 2


def test_cancelled_mid_prefill_and_queued_clients_leave_no_trace(server, solo):
    server.wait_idle()
    # ~1.5k tokens each (~50 prefill steps of 32 tokens), distinct so none reuses another's prefix
    longs = [user(f"Leaver {k}: " + "A very long question. " * 300) for k in range(4)]
    with ThreadPoolExecutor(24) as pool:
        leavers = [pool.submit(_impatient, server, long, 3000) for long in longs]
        others = [pool.submit(stream, server, prompt(i)) for i in range(16)]
        queued_leavers = [pool.submit(stream, server, prompt(i), 12, 0) for i in range(4)]
        assert [f.result() for f in others] == [(solo[i], None) for i in range(16)]
        assert all(f.result() for f in leavers) and all(f.result()[1] for f in queued_leavers)
    m = server.wait_idle()
    assert m["minicpmv_sequences_waiting"] == 0
    assert stream(server, prompt(5)) == (solo[5], None)


def _impatient(server, messages, max_tokens=8) -> bool:
    """A non-streaming client that gives up after half a second; True when it did."""
    try:
        server.post({"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True},
                    timeout=0.5)
    except httpx.TimeoutException:
        return True
    return False


def test_identical_image_requests_and_a_timeout_do_not_kill_the_engine(server, solo):
    with ThreadPoolExecutor(3) as pool:
        a = pool.submit(stream, server, prompt(0))
        b = pool.submit(stream, server, prompt(0))
        c = pool.submit(_impatient, server, prompt(0), 3000)
        assert a.result() == b.result() == (solo[0], None) and c.result()
    assert httpx.get(server.base + "/health").status_code == 200
    assert stream(server, prompt(2)) == (solo[2], None)


def test_64_streaming_clients_some_hanging_up(server, solo):
    for i in range(2):
        stream(server, prompt(i), 4)
    server.wait_idle()
    time.sleep(0.5)
    idle = server.rss()
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda i: (i, stream(server, prompt(i % 16), 12, 2 if i % 8 == 7 else None)),
                                range(64)))
    finished = [(i, r) for i, r in results if i % 8 != 7]
    assert all(r == (solo[i % 16], None) for i, r in finished), [r for i, r in finished if r != (solo[i % 16], None)]
    assert all(r[1] == "hung up" for i, r in results if i % 8 == 7)
    m = server.wait_idle()
    time.sleep(1.0)
    after = server.rss()
    print(f"\n64 clients: {len(finished)} complete and identical to solo, 8 hung up; "
          f"RSS idle {idle / 2**20:.0f} MiB -> after {after / 2**20:.0f} MiB; "
          f"KV blocks free {m['minicpmv_kv_blocks_free']:.0f}/{m['minicpmv_kv_blocks_capacity']:.0f}")
    assert after <= idle * 1.10 + 64 * 2**20, (idle, after)
    assert httpx.get(server.base + "/health").status_code == 200
