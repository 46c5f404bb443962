"""The engine loop: one thread alone touches the Engine (and so torch), the event loop never does.

`minicpmv serve` runs this loop on the process's main thread, the one that loaded the model, and
the HTTP event loop on another (`run_here`): a second thread running torch's parallel kernels gets
an OpenMP team of its own, and two teams on few cores make every engine step slower (cpu/openmp.py;
the same reason the prepare threads are confined). Embedded servers (tests, `create_app` in a
program) get a thread of their own (`start`).

The event loop hands over work and cancellations through a thread-safe inbox; between two
engine steps the thread takes everything waiting there, so a new request joins the running
batch at the next step (continuous batching) and an abort frees its sequence's state before the
next step runs. Outputs go back per request, one call into the event loop per step.

The loop cannot be killed by a request: the engine fails only the sequences a fault touches, a
fault the engine cannot attribute fails the requests in flight (each gets an error) and the loop
goes on, and if the thread ever ends every request still waiting is answered with an error.

Admission is counted on the event loop side in sequences (n > 1 counts n): at most
--max-concurrency run in the engine's batch and --max-queue more wait; beyond that a request is
answered 429 at once instead of piling up. Within that, the engine admits by free memory.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from ..cpu import heap
from ..engine.sequence import Sequence
from ..errors import InputError
from .errors import ApiError
from .jobs import Job
from .metrics import Metrics

log = logging.getLogger("minicpmv.server")
# how long the engine thread waits, once the last request ended, before its idle work takes the
# cores: the event loop sends the last step's tokens first
IDLE_GRACE_S = 0.02


class RequestHandle:
    """The event loop's view of one request: its sequences and a queue of what they produced.
    Queue items are lists of (choice index, token id, finished, finish reason), or an exception."""

    def __init__(self, seqs: list[Sequence], arrival: float):
        self.seqs = seqs
        self.arrival = arrival
        self.queue: asyncio.Queue = asyncio.Queue()
        self.first_token_at: float | None = None
        self.cached_tokens = 0  # prompt tokens served from the prefix cache (set by the engine thread)
        self.done = False  # set by the engine thread once no sequence of it is in the engine

    @property
    def finished(self) -> bool:
        return self.done

    async def outputs(self):
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item


class Worker:
    def __init__(self, model, metrics: Metrics, max_concurrency: int, max_queue: int, own_thread: bool = True):
        self.model = model
        self.engine = model.engine
        self.metrics = metrics
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.admitted = 0  # sequences admitted and not yet done; event loop only
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._owners: dict[int, tuple[RequestHandle, int]] = {}  # seq_id -> (handle, choice index); engine thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._running = False  # the loop is running (on whichever thread)
        self._crashed = False  # the loop ended on an exception, not on `stop`
        self._snapshot: dict = self.engine.metrics()
        self._own_thread = own_thread  # False: the caller runs the loop with `run_here`
        self._thread: threading.Thread | None = None

    # -- event loop side ------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the event loop `loop`; start the engine loop on a thread of its own unless the
        worker was made for `run_here`."""
        self._loop = loop
        if self._own_thread:
            self._running = True
            self._thread = threading.Thread(target=self._run, name="minicpmv-engine", daemon=True)
            self._thread.start()

    def run_here(self) -> bool:
        """Run the engine loop on this thread until `stop` (the main thread of `minicpmv serve`);
        outputs go to the event loop handed over by `start`. False when the loop ended on a fault."""
        if self._own_thread:
            raise RuntimeError("this worker runs its engine loop on a thread of its own")
        self._running = True
        self._run()
        return not self._crashed

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._running and not self._stopping

    def admit(self, n: int) -> None:
        if not self.alive:
            raise ApiError(503, "the engine is not running; the server is starting or shutting down")
        capacity = self.max_concurrency + self.max_queue
        if self.admitted + n > capacity:
            raise ApiError(429, f"server busy: {self.admitted} sequences in flight and room for {capacity} "
                                f"(--max-concurrency {self.max_concurrency} running + --max-queue {self.max_queue} "
                                f"waiting); retry shortly", code="server_busy", headers={"Retry-After": "1"})
        self.admitted += n

    def release(self, n: int) -> None:
        self.admitted -= n

    def submit(self, job: Job, arrival: float) -> RequestHandle:
        seqs = [Sequence(job.prompt_ids, p, job.vision, position_ids=job.position_ids, rope_delta=job.rope_delta,
                         reuse_boundary=job.reuse_boundary) for p in job.params]
        handle = RequestHandle(seqs, arrival)
        if not self.alive:
            raise ApiError(503, "the engine is not running; the server is starting or shutting down")
        self._inbox.put(("add", handle, None))
        return handle

    def cancel(self, handle: RequestHandle, index: int | None = None) -> None:
        """Free a request's sequences (or only choice `index`, e.g. after its stop string) before
        the next step: the client went away or needs no more tokens."""
        if not handle.finished:
            self._inbox.put(("abort", handle, index))

    def queue_depth(self) -> int:
        return max(self.admitted - len(self.engine.running), 0)

    def snapshot(self) -> dict:
        """The engine's counters, as last published by the engine thread (plain numbers)."""
        return dict(self._snapshot)

    # -- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException as e:  # noqa: BLE001 - nothing may leave a request waiting forever
            log.exception("the engine loop stopped")
            self._crashed = True
            self._fail_everything(ApiError(503, f"the engine stopped: {type(e).__name__}"))
        finally:
            self._running = False
            self._fail_everything(ApiError(503, "the server is shutting down"))

    def _wait(self, idle_at: float | None, release_at: float | None) -> tuple[list, float | None, float | None]:
        """The next message, blocking while the engine has nothing to run. With none come by `idle_at`
        (monotonic), the engine's idle work runs (Engine.idle: state slots and KV blocks the next
        prompts take are written off their path) and the heap's release is set
        heap.idle_release_s() later; with none come by `release_at`, the heap's free pages go back
        to the OS (a burst's memory returns, while the next request of a steady stream does not
        fault it all back in). -> (messages, the idle work still due, the release still due)."""
        while True:
            due = [t for t in (idle_at, release_at) if t is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            try:
                return [self._inbox.get(timeout=timeout)], idle_at, release_at
            except queue.Empty:
                if idle_at is not None and idle_at <= time.monotonic():
                    self._guarded(self.engine.idle)
                    idle_at, release_at = None, time.monotonic() + heap.idle_release_s()
                elif release_at is not None and release_at <= time.monotonic():
                    heap.release()  # what the busiest step kept mapped (cpu/heap.py)
                    release_at = None

    def _loop_forever(self) -> None:
        self._guarded(self.engine.idle)
        idle_at = release_at = None
        while True:
            messages = []
            if not self.engine.has_work():
                messages, idle_at, release_at = self._wait(idle_at, release_at)
            while True:
                try:
                    messages.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for message in messages:
                if message is None:
                    return
                self._guarded(self._take, *message)
            self._snapshot = self.engine.metrics()
            if not self.engine.has_work():
                continue
            idle_at = release_at = None
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a fault the engine could not pin on one request
                log.exception("engine step failed")
                outputs = self.engine.fail_all(e)
            self._guarded(self._deliver, outputs)
            self._snapshot = self.engine.metrics()
            if not self.engine.has_work():  # the last request ended: idle work once its tokens are out
                idle_at = time.monotonic() + IDLE_GRACE_S

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - bookkeeping must not end the loop either
            log.exception("engine thread: %s failed", fn.__name__)

    def _take(self, kind: str, handle: RequestHandle, index: int | None = None) -> None:
        if kind == "abort":
            for seq in handle.seqs if index is None else [handle.seqs[index]]:
                if self._owners.pop(seq.seq_id, None) is not None:
                    self.engine.abort(seq)
            self._mark_done(handle)
            return
        for i, seq in enumerate(handle.seqs):
            try:
                self.engine.add(seq)
            except InputError as e:
                self._take("abort", handle)
                self._send(handle, e)
                return
            self._owners[seq.seq_id] = (handle, i)

    def _deliver(self, outputs) -> None:
        per_handle: dict[int, tuple[RequestHandle, list]] = {}
        failed: dict[int, tuple[RequestHandle, BaseException]] = {}
        prompt_tokens = new_tokens = 0
        for out in outputs:
            owner = self._owners.get(out.seq.seq_id)
            if owner is None:
                continue
            handle, index = owner
            if out.finished:
                del self._owners[out.seq.seq_id]
            if out.token_id is None:  # the engine failed this sequence
                failed[id(handle)] = (handle, out.seq.error)
                continue
            new_tokens += 1
            if len(out.seq.output_ids) == 1:
                prompt_tokens += len(out.seq.prompt_ids)
                handle.cached_tokens = max(handle.cached_tokens, out.seq.num_cached)
            per_handle.setdefault(id(handle), (handle, []))[1].append(
                (index, out.token_id, out.finished, out.seq.finish_reason))
        self.metrics.step(new_tokens, prompt_tokens)
        for key, (handle, items) in per_handle.items():
            if key not in failed:
                self._send(handle, items)
                self._mark_done(handle)
        for handle, error in failed.values():
            self._take("abort", handle)  # the request's other choices go too
            self._send(handle, _api_error(error))

    def _mark_done(self, handle: RequestHandle) -> None:
        handle.done = not any(s.seq_id in self._owners for s in handle.seqs)

    def _fail_everything(self, error: ApiError) -> None:
        for handle, _ in list(self._owners.values()):
            self._send(handle, error)
            handle.done = True
        self._owners.clear()
        while True:  # requests handed over but never taken
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            if message is not None and message[0] == "add":
                self._send(message[1], error)

    def _send(self, handle: RequestHandle, item) -> None:
        if self._loop is None:  # nothing was ever served
            return
        try:
            self._loop.call_soon_threadsafe(handle.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


def _api_error(error: BaseException | None) -> ApiError:
    if isinstance(error, ValueError):  # InputError and friends: the request's own content
        return ApiError(400, f"generation failed: {error}")
    return ApiError(500, f"generation failed: {type(error).__name__}: {error}" if error else "generation failed",
                    code="internal_error")
