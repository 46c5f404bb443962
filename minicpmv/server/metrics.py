"""Prometheus text exposition (format 0.0.4) of what an operator watches: queue depth, running
sequences, token throughput, time to first token, request outcomes, encoder-cache hits, memory.

Written by hand (a few counters, one histogram) rather than with prometheus_client: the values
live in two threads' plain ints, read once per scrape. Counters only grow; gauges are sampled
at scrape time from the worker.
"""
from __future__ import annotations

import bisect
import os
import threading
import time
from collections import deque

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
THROUGHPUT_WINDOW_S = 10.0


class Histogram:
    def __init__(self, buckets):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts):
            total += count
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {total}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()  # the engine thread and the event loop both record
        self.requests = {}  # outcome -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self._recent = deque()  # (time, tokens) per engine step, for tokens/s

    def request_done(self, outcome: str) -> None:
        with self.lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def step(self, new_tokens: int, prompt_tokens: int = 0) -> None:
        now = time.monotonic()
        with self.lock:
            self.generation_tokens += new_tokens
            self.prompt_tokens += prompt_tokens
            self._recent.append((now, new_tokens))
            while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
                self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            return sum(n for t, n in self._recent if t >= now - THROUGHPUT_WINDOW_S) / THROUGHPUT_WINDOW_S

    def render(self, gauges: dict[str, tuple[str, float]], counters: dict[str, tuple[str, float]] | None = None) -> str:
        """gauges: name -> (help, value), sampled by the caller; counters likewise, for values that
        only grow (their names end in _total, as Prometheus expects of a counter)."""
        lines = []

        def metric(name, kind, help_, values):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *values])

        for name, (help_, value) in gauges.items():
            metric(name, "gauge", help_, [f"{name} {value}"])
        for name, (help_, value) in (counters or {}).items():
            if not name.endswith("_total"):
                raise ValueError(f"counter {name} must end in _total")
            metric(name, "counter", help_, [f"{name} {value}"])
        metric("minicpmv_generation_tokens_per_second", "gauge",
               f"Tokens generated per second over the last {THROUGHPUT_WINDOW_S:g} s",
               [f"minicpmv_generation_tokens_per_second {self.tokens_per_second():.3f}"])
        with self.lock:
            metric("minicpmv_requests_total", "counter", "Finished requests by outcome",
                   [f'minicpmv_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.requests.items())])
            metric("minicpmv_prompt_tokens_total", "counter", "Prompt tokens prefilled",
                   [f"minicpmv_prompt_tokens_total {self.prompt_tokens}"])
            metric("minicpmv_generation_tokens_total", "counter", "Tokens generated",
                   [f"minicpmv_generation_tokens_total {self.generation_tokens}"])
            metric("minicpmv_time_to_first_token_seconds", "histogram",
                   "From request arrival to its first generated token", self.ttft.lines(
                       "minicpmv_time_to_first_token_seconds"))
        metric("process_resident_memory_bytes", "gauge", "Resident set size of the server process",
               [f"process_resident_memory_bytes {resident_bytes()}"])
        return "\n".join(lines) + "\n"


def resident_bytes() -> int:
    """RSS from /proc (Linux); 0 where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
