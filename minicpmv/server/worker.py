"""The engine thread: it alone touches the Engine (and so torch), the event loop never does.

The event loop hands over work and cancellations through a thread-safe inbox; between two
engine steps the thread takes everything waiting there, so a new request joins the running
batch at the next step (continuous batching) and an abort frees its sequence's state before the
next step runs. Outputs go back per request, one call into the event loop per step.

Admission is counted on the event loop side in sequences (n > 1 counts n): at most
--max-concurrency run in the engine's batch and --max-queue more wait; beyond that a request is
answered 429 at once instead of piling up.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import queue
import threading

from ..engine.sequence import Sequence, Status
from ..errors import InputError
from .errors import ApiError
from .jobs import Job
from .metrics import Metrics

log = logging.getLogger("minicpmv.server")


class RequestHandle:
    """The event loop's view of one request: its sequences and a queue of what they produced.
    Queue items are lists of (choice index, token id, finished, finish reason), or an exception."""

    def __init__(self, seqs: list[Sequence], arrival: float):
        self.seqs = seqs
        self.arrival = arrival
        self.queue: asyncio.Queue = asyncio.Queue()
        self.first_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs)

    async def outputs(self):
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item


class Worker:
    def __init__(self, model, metrics: Metrics, max_concurrency: int, max_queue: int):
        self.model = model
        self.engine = model.engine
        self.engine.max_batch_size = max_concurrency
        self.metrics = metrics
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.admitted = 0  # sequences admitted and not yet done; event loop only
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._owners: dict[int, tuple[RequestHandle, int]] = {}  # seq_id -> (handle, choice index); engine thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="minicpmv-engine", daemon=True)

    # -- event loop side ------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

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
        seqs = [Sequence(prompt_ids=job.prompt_ids, params=p, vision=job.vision, position_ids=job.position_ids,
                         rope_delta=job.rope_delta) for p in job.params]
        handle = RequestHandle(seqs, arrival)
        self._inbox.put(("add", handle, None))
        return handle

    def cancel(self, handle: RequestHandle, index: int | None = None) -> None:
        """Free a request's sequences (or only choice `index`, e.g. after its stop string) before
        the next step: the client went away or needs no more tokens."""
        if not handle.finished:
            self._inbox.put(("abort", handle, index))

    def queue_depth(self) -> int:
        return max(self.admitted - len(self.engine.running), 0)

    # -- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        was_busy = False
        while True:
            messages = [self._inbox.get()] if not self.engine.has_work() else []
            while True:
                try:
                    messages.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for message in messages:
                if message is None:
                    return
                self._take(*message)
            if not self.engine.has_work():
                if was_busy:
                    _release_freed_memory()
                was_busy = False
                continue
            was_busy = True
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
                self._fail_step(e)
                continue
            self._deliver(outputs)

    def _take(self, kind: str, handle: RequestHandle, index: int | None = None) -> None:
        if kind == "abort":
            for seq in handle.seqs if index is None else [handle.seqs[index]]:
                if self._owners.pop(seq.seq_id, None) is not None:
                    self.engine.abort(seq)
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
        prompt_tokens = 0
        for out in outputs:
            handle, index = self._owners[out.seq.seq_id]
            if len(out.seq.output_ids) == 1:
                prompt_tokens += len(out.seq.prompt_ids)
            if out.finished:
                del self._owners[out.seq.seq_id]
            per_handle.setdefault(id(handle), (handle, []))[1].append(
                (index, out.token_id, out.finished, out.seq.finish_reason))
        self.metrics.step(len(outputs), prompt_tokens)
        for handle, items in per_handle.values():
            self._send(handle, items)

    def _fail_step(self, error: Exception) -> None:
        log.exception("engine step failed")
        failed = [(sid, h) for sid, (h, i) in self._owners.items() if h.seqs[i].finish_reason == "error"]
        if not failed:  # a batched decode failed: every running sequence is suspect
            failed = [(s.seq_id, self._owners[s.seq_id][0]) for s in list(self.engine.running)]
        status = 400 if isinstance(error, ValueError) else 500
        for sid, handle in failed:
            if sid in self._owners:
                self._take("abort", handle)
                self._send(handle, ApiError(status, f"generation failed: {error}"))

    def _send(self, handle: RequestHandle, item) -> None:
        try:
            self._loop.call_soon_threadsafe(handle.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS once the engine goes idle, so the RSS falls back
    after a burst instead of staying at its peak (glibc keeps freed arenas otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
