"""Continuous batching under a real `minicpmv serve`: batched answers equal solo answers, a
bounded load run completes without errors and gives its memory back, and a client that hangs up
frees its slot at once. Loopback only; every loop is bounded in count and time."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from test_server_support import MODEL_NAME, ServerProcess, image_part, photo, user


@pytest.fixture(scope="module")
def server(tiny46_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with pytest.MonkeyPatch.context() as env:  # the heap goes back 0.5 s into an idle spell (default 30 s)
        env.setenv("MINICPMV_HEAP_IDLE_S", "0.5")
        s = ServerProcess(tiny46_dir, "--max-concurrency", "32", "--max-queue", "128", log_path=log)
    yield s
    s.stop()


def prompt(i: int) -> list[dict]:
    """32 different prompts: every other one with its own image (sizes differ, so do slices)."""
    if i % 2 == 0:
        return user(image_part(photo(64 + 9 * i, 96 + 5 * i, 100 + i)), f"Question {i}: what do you see?")
    return user(f"Tell me about topic number {i}. " * (1 + i % 4))


def answer(client, i: int, max_tokens: int = 12):
    r = client.chat.completions.create(model=MODEL_NAME, messages=prompt(i), max_tokens=max_tokens, temperature=0)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens


def test_32_concurrent_greedy_requests_equal_their_solo_answers(server):
    client = server.client()
    alone = [answer(client, i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda i: answer(client, i), range(32)))
    print(f"\nbatching: {sum(a == b for a, b in zip(alone, together))}/32 identical (text, finish, usage)")
    assert together == alone
    assert len({a[0] for a in alone}) >= 24  # the prompts really differ (a random model repeats itself a little)


def stream_one(server, i: int) -> tuple[int, str | None]:
    """One streaming request over raw SSE; (tokens of content seen, error or None)."""
    body = {"model": MODEL_NAME, "messages": prompt(i % 32), "max_tokens": 16, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    try:
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, headers=headers,
                          timeout=120) as response:
            if response.status_code != 200:
                return 0, f"HTTP {response.status_code}: {response.read()[:200]!r}"
            usage, done, finish = None, False, None
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return 0, str(chunk["error"])
                    usage = chunk.get("usage") or usage
                    finish = next((c.get("finish_reason") for c in chunk["choices"] if c.get("finish_reason")), finish)
            if not done or finish is None or usage is None:
                return 0, f"incomplete stream (done={done}, finish={finish}, usage={usage})"
            return usage["completion_tokens"], None
    except httpx.HTTPError as e:
        return 0, repr(e)


def test_load_128_streams_from_32_clients_and_memory_returns(server):
    client = server.client()
    for i in range(4):  # warm every code path once, then take the idle level
        answer(client, i, max_tokens=4)
    server.wait_idle()
    time.sleep(0.5)
    idle = server.rss()
    start = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: stream_one(server, i), range(128)))
    elapsed = time.monotonic() - start
    errors = [e for _, e in results if e]
    tokens = sum(n for n, _ in results)
    metrics = server.wait_idle()
    time.sleep(1.5)  # the engine thread trims the heap 0.5 s into its idle spell
    after = server.rss()
    print(f"\nload: {len(results) - len(errors)}/128 streams completed, {len(errors)} errors, {tokens} tokens in "
          f"{elapsed:.1f}s ({tokens / elapsed:.0f} tok/s); RSS idle {idle / 2**20:.0f} MiB -> after "
          f"{after / 2**20:.0f} MiB; ttft count {metrics['minicpmv_time_to_first_token_seconds_count']:.0f}")
    assert errors == []
    assert tokens == 128 * 16
    assert metrics["minicpmv_queue_depth"] == 0 and metrics["minicpmv_sequences_running"] == 0
    assert after <= idle * 1.10 + 64 * 2**20, (idle, after)


def test_a_client_that_hangs_up_frees_its_slot(server):
    server.wait_idle()
    before = server.metrics()
    body = {"model": MODEL_NAME, "messages": prompt(1), "max_tokens": 3000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, headers=headers,
                      timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):  # a few chunks in: the sequence is decoding
            next(lines)
        assert server.metrics()["minicpmv_sequences_running"] == 1
    hung_up = time.monotonic()  # leaving the block closed the connection mid-stream
    after = server.wait_idle(timeout=10)
    print(f"\ndisconnect: slot freed {time.monotonic() - hung_up:.2f}s after the client hung up")
    assert after['minicpmv_requests_total{outcome="cancelled"}'] == \
        before.get('minicpmv_requests_total{outcome="cancelled"}', 0) + 1
    assert after["minicpmv_generation_tokens_total"] - before["minicpmv_generation_tokens_total"] < 3000

    # the same for a non-streaming request whose client gives up waiting
    stop = threading.Event()

    def impatient():
        try:
            server.post({**body, "stream": False}, timeout=1.5)
        except httpx.TimeoutException:
            stop.set()

    thread = threading.Thread(target=impatient)
    thread.start()
    thread.join(30)
    assert stop.is_set()
    final = server.wait_idle(timeout=10)
    assert final['minicpmv_requests_total{outcome="cancelled"}'] == \
        after['minicpmv_requests_total{outcome="cancelled"}'] + 1
