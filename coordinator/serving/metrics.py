"""Prometheus text-format metrics with labels: counters and histograms, thread-safe, no dependency."""

from __future__ import annotations

import threading
from collections.abc import Iterable

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
             for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            for labels, value in sorted(self.values.items()):
                yield f"{self.name}{_labels(self.label_names, labels)} {value:g}"


class Histogram:
    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name, self.help, self.label_names, self.buckets = name, help_text, labels, buckets
        self.series: dict[tuple[str, ...], tuple[list[int], float, int]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            counts, total, n = self.series.get(labels, ([0] * len(self.buckets), 0.0, 0))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            self.series[labels] = (counts, total + value, n + 1)

    def count(self, *labels: str) -> int:
        return self.series.get(labels, ([], 0.0, 0))[2]

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            for labels, (counts, total, n) in sorted(self.series.items()):
                for bound, count in zip(self.buckets, counts, strict=True):
                    le = 'le="' + f"{bound:g}" + '"'
                    yield f"{self.name}_bucket{_labels(self.label_names, labels, le)} {count}"
                inf = 'le="+Inf"'
                yield f"{self.name}_bucket{_labels(self.label_names, labels, inf)} {n}"
                yield f"{self.name}_sum{_labels(self.label_names, labels)} {total:g}"
                yield f"{self.name}_count{_labels(self.label_names, labels)} {n}"


class ServingMetrics:
    def __init__(self) -> None:
        adapter = ("adapter",)
        self.latency = Histogram("offsite_request_latency_seconds", "Request latency, admission to last token.",
                                 adapter)
        self.ttft = Histogram("offsite_time_to_first_token_seconds", "Admission to first generated token.", adapter)
        self.queue = Histogram("offsite_queue_seconds", "Time a request waited for a batch.", adapter)
        self.batch_size = Histogram("offsite_batch_size", "Requests per batch.", (), SIZE_BUCKETS)
        self.tokens = Counter("offsite_generated_tokens_total", "Tokens generated (rate() gives tokens/s).", adapter)
        self.prompt_tokens = Counter("offsite_prompt_tokens_total", "Prompt tokens processed.", adapter)
        self.requests = Counter("offsite_requests_total", "Requests finished, by status.", ("adapter", "status"))
        self.deadline_misses = Counter("offsite_deadline_misses_total", "Requests past their deadline.", adapter)
        self.cache = Counter("offsite_adapter_cache_events_total", "Adapter cache hits, misses, evictions.",
                             ("adapter", "event"))

    def render(self) -> str:
        parts = (self.latency, self.ttft, self.queue, self.batch_size, self.tokens, self.prompt_tokens,
                 self.requests, self.deadline_misses, self.cache)
        return "\n".join(line for metric in parts for line in metric.render()) + "\n"
