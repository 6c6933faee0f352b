"""Counters, gauges and histograms in Prometheus' text format (no client library: a few dozen lines)."""

from __future__ import annotations

import threading
import time
from collections import deque

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 30.0  # tokens/s is measured over this many seconds


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Written by the engine thread and the HTTP handlers; read by GET /metrics. One lock for all."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.http = {}  # (path, status) -> count
        self.tokens_total = 0
        self._recent = deque()  # (time, tokens) of finished engine requests within RATE_WINDOW_S
        self.ttft = Histogram(TTFT_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)
        self.cancelled = 0
        self.rejected = 0  # 429s
        self.engine_errors = 0
        self.gauges = {"queue_depth": 0, "running_requests": 0, "running_rows": 0, "requests_in_flight": 0, "ready": 0}

    def count_http(self, path: str, status: int) -> None:
        with self._lock:
            self.http[(path, status)] = self.http.get((path, status), 0) + 1

    def add_tokens(self, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.tokens_total += n
            self._recent.append((now, n))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            total = sum(n for _, n in self._recent)
        window = min(RATE_WINDOW_S, max(1e-3, time.time() - self.started))
        return total / window

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_duration(self, seconds: float) -> None:
        with self._lock:
            self.duration.observe(seconds)

    def incr(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def set_gauges(self, **values) -> None:
        with self._lock:
            self.gauges.update(values)

    def render(self) -> str:
        rate = self.tokens_per_second()
        with self._lock:
            g = dict(self.gauges)
            lines = [
                "# HELP tokenloom_ready 1 once the model is loaded and the engine loop runs.",
                "# TYPE tokenloom_ready gauge", f"tokenloom_ready {g['ready']}",
                "# HELP tokenloom_queue_depth Engine requests waiting to join the running batch.",
                "# TYPE tokenloom_queue_depth gauge", f"tokenloom_queue_depth {g['queue_depth']}",
                "# HELP tokenloom_running_requests Engine requests (batch rows before guidance) being decoded.",
                "# TYPE tokenloom_running_requests gauge", f"tokenloom_running_requests {g['running_requests']}",
                "# HELP tokenloom_running_rows Batch rows being decoded (guided requests add a row per guidance term).",
                "# TYPE tokenloom_running_rows gauge", f"tokenloom_running_rows {g['running_rows']}",
                "# HELP tokenloom_requests_in_flight HTTP requests admitted and not finished (running or waiting).",
                "# TYPE tokenloom_requests_in_flight gauge",
                f"tokenloom_requests_in_flight {g['requests_in_flight']}",
                "# HELP tokenloom_generated_tokens_total Tokens generated (text, image codes and markup).",
                "# TYPE tokenloom_generated_tokens_total counter",
                f"tokenloom_generated_tokens_total {self.tokens_total}",
                f"# HELP tokenloom_tokens_per_second Generated tokens per second over the last {RATE_WINDOW_S:g} s.",
                "# TYPE tokenloom_tokens_per_second gauge", f"tokenloom_tokens_per_second {rate:.3f}",
                "# HELP tokenloom_time_to_first_token_seconds From admission to the first text or image token.",
                "# TYPE tokenloom_time_to_first_token_seconds histogram",
                *self.ttft.lines("tokenloom_time_to_first_token_seconds"),
                "# HELP tokenloom_request_duration_seconds From admission to the last event of a request.",
                "# TYPE tokenloom_request_duration_seconds histogram",
                *self.duration.lines("tokenloom_request_duration_seconds"),
                "# HELP tokenloom_requests_cancelled_total Requests cancelled because their client went away.",
                "# TYPE tokenloom_requests_cancelled_total counter",
                f"tokenloom_requests_cancelled_total {self.cancelled}",
                "# HELP tokenloom_requests_rejected_total Requests refused with 429 (queue full).",
                "# TYPE tokenloom_requests_rejected_total counter",
                f"tokenloom_requests_rejected_total {self.rejected}",
                "# HELP tokenloom_engine_errors_total Engine steps that raised (their requests failed with 500).",
                "# TYPE tokenloom_engine_errors_total counter", f"tokenloom_engine_errors_total {self.engine_errors}",
                "# HELP tokenloom_http_requests_total HTTP responses by path and status code.",
                "# TYPE tokenloom_http_requests_total counter",
            ]
            lines += [f'tokenloom_http_requests_total{{path="{p}",code="{c}"}} {n}'
                      for (p, c), n in sorted(self.http.items())]
        return "\n".join(lines) + "\n"
