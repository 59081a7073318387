"""Requests as jobs, and the queue the batcher takes them from: one kind per batch, lengths close to the oldest
job's, at most ``max_batch_size`` jobs and ``max_batch_tokens`` padded tokens, after at most ``max_wait_s``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import InvalidSettingError

Event = dict[str, Any]


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16
    max_batch_tokens: int = 4096  # padded prompt + new tokens over the batch
    max_wait_s: float = 0.01
    max_prompt_tokens: int = 512
    max_new_tokens: int = 256
    cache_mb: int = 1024
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_batch_tokens", "max_prompt_tokens", "max_new_tokens", "cache_mb",
                     "threads"):
            if getattr(self, name) < 1:
                raise InvalidSettingError(f"{{{name}}} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_wait_s <= 10:
            raise InvalidSettingError(f"{{max_wait_s}} must be in [0, 10], got {self.max_wait_s}")


@dataclass(eq=False)
class Job:
    kind: str  # "generate" or "classify"
    adapter_id: str
    input_ids: list[int]
    max_new_tokens: int = 0
    deadline: float | None = None  # time.monotonic() after which the answer is useless
    top_k: int = 5
    emit: Callable[[Event], None] = lambda event: None
    enqueued: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    on_finish: list[Callable[[], None]] = field(default_factory=list)
    finished: bool = False

    @property
    def cost(self) -> int:
        return len(self.input_ids) + self.max_new_tokens

    def _finish(self, event: Event) -> None:
        if self.finished:
            return
        self.finished = True
        for callback in self.on_finish:
            callback()
        self.emit(event)

    def token(self, text: str) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.emit({"type": "token", "text": text})

    def done(self, **result: Any) -> None:
        self._finish({"type": "done", **result})

    def fail(self, status: int, code: str, message: str) -> None:
        self._finish({"type": "error", "status": status, "code": code, "message": message})


class JobQueue:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._jobs: list[Job] = []
        self._cond = threading.Condition()

    def put(self, job: Job) -> None:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._jobs)

    def _pick(self, room: int | None = None) -> list[Job]:
        """The oldest job and those of its kind closest to it in length, within the size and token budgets;
        ``room``: at most that many generate jobs (the rows a running decode batch has left)."""
        oldest = self._jobs[0]
        limit = self.config.max_batch_size if room is None or oldest.kind != "generate" else room
        same = sorted((j for j in self._jobs if j.kind == oldest.kind),
                      key=lambda j: (abs(len(j.input_ids) - len(oldest.input_ids)), j.enqueued))
        batch: list[Job] = []
        longest = new = 0
        for job in same:
            longest_, new_ = max(longest, len(job.input_ids)), max(new, job.max_new_tokens)
            if len(batch) + 1 > limit or batch and (
                    (len(batch) + 1) * (longest_ + new_) > self.config.max_batch_tokens):
                continue
            batch.append(job)
            longest, new = longest_, new_
        return batch

    def take_now(self, room: int) -> list[Job]:
        """Without waiting: a batch as :meth:`take` would pick it, with at most ``room`` generate jobs (those join
        a running decode batch between its steps)."""
        with self._cond:
            if not self._jobs:
                return []
            batch = self._pick(room)
            taken = set(map(id, batch))
            self._jobs = [j for j in self._jobs if id(j) not in taken]
            return batch

    def _full(self) -> bool:
        return len(self._pick()) >= self.config.max_batch_size

    def take(self, stop: threading.Event) -> list[Job]:
        with self._cond:
            while not self._jobs and not stop.is_set():
                self._cond.wait(timeout=0.5)
            if stop.is_set():
                return []
            until = self._jobs[0].enqueued + self.config.max_wait_s
            while not stop.is_set() and not self._full() and (left := until - time.monotonic()) > 0:
                self._cond.wait(timeout=left)
            batch = self._pick()
            taken = set(map(id, batch))
            self._jobs = [j for j in self._jobs if id(j) not in taken]
            return batch
