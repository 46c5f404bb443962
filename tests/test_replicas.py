"""`minicpmv serve --replicas 2` on a local two-node Ray cluster (`ray start --head` and
`ray start --address` on 127.0.0.1), tiny checkpoints, one replica per node. Slow (Ray and
two model loads on a 2-core machine): behind the `ray` marker,
`python -m pytest -m ray tests/test_replicas.py`."""
from __future__ import annotations

import os
import signal
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import minicpmv
from ray_cluster import LocalRayCluster
from test_server_support import MODEL_NAME, free_port, image_url, photo

pytestmark = pytest.mark.ray
REPLICA = "x-minicpmv-replica"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def cluster():
    c = LocalRayCluster(nodes=2, cpus_per_node=3)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def endpoint(cluster, tiny46_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("replicas") / "serve.log"
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "minicpmv.cli", "serve", "--model", str(tiny46_dir), "--served-model-name", MODEL_NAME,
           "--port", str(port), "--dtype", "float32", "--device", "cpu", "--threads", "1", "--replicas", "2",
           "--max-replicas-per-node", "1", "--health-check-period", "2", "--max-concurrency", "32"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_ADDRESS": cluster.address})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        if "replica(s) ready" in log_path.read_text():
            break
        time.sleep(1)
    else:
        proc.kill()
        raise AssertionError("replicas not ready: " + log_path.read_text()[-3000:])
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def local(tiny46_dir):
    return minicpmv.load(tiny46_dir, dtype="float32", device="cpu", progress=False)


def ask(base, messages, **headers) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    return httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=300)


def metrics_of(base, replica: str) -> dict[str, float]:
    """/metrics of one replica: a session id that routes there, found by asking."""
    for i in range(200):
        r = httpx.get(base + "/metrics", headers={"x-session-id": f"probe-{i}"}, timeout=30)
        if r.headers[REPLICA] == replica:
            return {name: float(value) for name, value in re.findall(r"^(\w+) (\S+)$", r.text, re.M)}
    raise AssertionError(f"no probe reached replica {replica}")


def test_32_concurrent_requests_are_all_correct_and_use_both_replicas(endpoint, local):
    questions = [f"Question {i}: what is {i} plus {3 * i}?" for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda q: ask(endpoint, [{"role": "user", "content": q}]), questions))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    for q, r in zip(questions, replies):
        ref = local.chat(msgs=[{"role": "user", "content": q}], do_sample=False, max_new_tokens=MAX_TOKENS)
        assert r.json()["choices"][0]["message"]["content"] == str(ref), q
    used = {r.headers[REPLICA] for r in replies}
    assert len(used) == 2, used


def test_a_conversation_stays_on_its_replica_and_reuses_its_cached_state(endpoint, local):
    image = photo(160, 200, 11)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(image)}},
                                             {"type": "text", "text": "What is this?"}]}]
    first = ask(endpoint, messages)
    assert first.status_code == 200
    replica = first.headers[REPLICA]
    before = metrics_of(endpoint, replica)
    for follow_up in ("Tell me more.", "And the colours?"):
        messages += [{"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
                     {"role": "user", "content": follow_up}]
        first = ask(endpoint, messages)
        assert first.status_code == 200 and first.headers[REPLICA] == replica
        # the earlier turns' state (image included) came from that replica's prefix cache
        assert first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    after = metrics_of(endpoint, replica)
    assert after["minicpmv_prefix_cache_hits_total"] >= before["minicpmv_prefix_cache_hits_total"] + 2
    assert after["minicpmv_encoder_cache_misses_total"] == before["minicpmv_encoder_cache_misses_total"]


def test_a_killed_replica_is_replaced_while_the_other_keeps_answering(endpoint, cluster):
    import ray

    warm = [ask(endpoint, [{"role": "user", "content": f"warm {i}"}]) for i in range(8)]
    replicas = {r.headers[REPLICA] for r in warm}
    assert len(replicas) == 2
    victim, survivor = sorted(replicas)
    results, stop = [], threading.Event()

    def traffic():
        i = 0
        while not stop.is_set():
            r = ask(endpoint, [{"role": "user", "content": f"load {i}"}])
            results.append((time.monotonic(), r.status_code, r.headers.get(REPLICA)))
            i += 1

    ray.init(address=cluster.address, namespace="test-replicas", log_to_driver=False)
    worker = threading.Thread(target=traffic)
    try:
        worker.start()
        time.sleep(2)
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(f"SERVE_REPLICA::minicpmv#engine#{victim}", namespace="serve"), no_restart=True)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not any(rep not in replicas for _, _, rep in results):
            time.sleep(1)
    finally:
        stop.set()
        worker.join()
        ray.shutdown()
    during = [(s, rep) for t, s, rep in results if t > killed_at]
    assert during and all(s == 200 for s, _ in during), during
    fresh = {rep for _, rep in during} - replicas
    assert len(fresh) == 1, "Serve started a replacement and it answers"
    assert survivor in {rep for _, rep in during}, "the surviving replica kept answering"
    late = [rep for t, s, rep in results if t > killed_at + 30]
    assert victim not in late


def test_without_ray_address_it_starts_and_stops_its_own_ray(tiny46_dir, tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    # no RAY_ADDRESS; no auth token either (a local Ray would otherwise write ~/.ray/auth_token,
    # which turns token authentication on for later `ray start` clusters on this machine)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "minicpmv.cli", "serve", "--model", str(tiny46_dir), "--served-model-name", MODEL_NAME,
           "--port", str(port), "--dtype", "float32", "--device", "cpu", "--threads", "1", "--replicas", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "replica(s) ready" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(1)
        reply = ask(f"http://127.0.0.1:{port}", [{"role": "user", "content": "hello"}])
        assert reply.status_code == 200 and reply.headers[REPLICA]
        os.killpg(proc.pid, signal.SIGTERM)  # as Ctrl-C or a service manager would
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
