"""The server's engine thread between requests: once the last request has ended (and with no other
message arriving), it runs the engine's idle work after a short grace and gives the heap back
$MINICPMV_HEAP_IDLE_S later; a request arriving in between puts both off."""
import asyncio
import time
from types import SimpleNamespace

from fake_model import FakeModel, reference_tokens
from minicpmv.cpu import heap
from minicpmv.engine.config import EngineConfig
from minicpmv.engine.engine import Engine
from minicpmv.engine.sampling import SamplingParams
from minicpmv.server.metrics import Metrics
from minicpmv.server.worker import Worker

PROMPT = [5, 9, 14, 3, 7, 22, 1]


def job(n: int = 3):
    return SimpleNamespace(prompt_ids=PROMPT, params=[SamplingParams(max_new_tokens=n, stop_token_ids=[])], vision=[],
                           position_ids=None, rope_delta=0, reuse_boundary=None)


async def answer(worker: Worker) -> list[int]:
    handle = worker.submit(job(), time.monotonic())
    tokens = []
    async for items in handle.outputs():
        tokens += [token for _, token, _, _ in items]
        if any(finished for _, _, finished, _ in items):
            return tokens


def serve(monkeypatch, scenario):
    """Run `scenario(worker, events)` on an event loop with a worker on its own engine thread; events
    records ("idle" | "release", monotonic time) as the engine thread does them."""
    monkeypatch.setenv("MINICPMV_HEAP_IDLE_S", "0.3")
    events = []
    monkeypatch.setattr(heap, "release", lambda: events.append(("release", time.monotonic())))
    engine = Engine(FakeModel(), EngineConfig(max_context=1000, block_size=4, kv_cache_memory=1 << 20))
    idle = engine.idle
    engine.idle = lambda: (events.append(("idle", time.monotonic())), idle())

    async def main():
        worker = Worker(SimpleNamespace(engine=engine), Metrics(), max_concurrency=4, max_queue=4)
        worker.start(asyncio.get_running_loop())
        try:
            return await scenario(worker, events)
        finally:
            worker.stop()

    return asyncio.run(main())


def test_idle_work_and_the_heap_release_follow_the_last_request_without_another_message(monkeypatch):
    async def scenario(worker, events):
        await asyncio.sleep(0.05)
        assert [kind for kind, _ in events] == ["idle"]  # at start
        tokens = await answer(worker)
        ended = time.monotonic()
        await asyncio.sleep(0.9)
        return tokens, ended, list(events)

    tokens, ended, events = serve(monkeypatch, scenario)
    assert tokens == reference_tokens(PROMPT, 3)
    after = events[1:]
    assert [kind for kind, _ in after] == ["idle", "release"], events
    (_, idle_at), (_, release_at) = after
    assert idle_at - ended < 0.25  # a grace of worker.IDLE_GRACE_S, not a wait for the next message
    assert 0.25 <= release_at - idle_at < 0.6  # $MINICPMV_HEAP_IDLE_S after the idle work


def test_a_request_inside_the_idle_spell_puts_the_release_off(monkeypatch):
    async def scenario(worker, events):
        await answer(worker)
        await asyncio.sleep(0.15)  # idle work done, release due 0.3 s after it
        second = await answer(worker)
        second_ended = time.monotonic()
        await asyncio.sleep(0.2)
        middle = list(events)
        await asyncio.sleep(0.4)
        return second, second_ended, middle, list(events)

    second, second_ended, middle, events = serve(monkeypatch, scenario)
    assert second == reference_tokens(PROMPT, 3)
    assert [kind for kind, _ in middle] == ["idle", "idle", "idle"]  # start, after each request; no release yet
    assert [kind for kind, _ in events] == ["idle", "idle", "idle", "release"]
    assert events[-1][1] - second_ended >= 0.28
