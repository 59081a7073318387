"""Bounded streaming transfers: caps on concurrent uploads and downloads (overall and per owner), and an idle
timeout that cancels a stream that neither sends nor receives for too long, so stalled peers cannot hold the
server's threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from coordinator.errors import CoordinatorError


class TooBusyError(CoordinatorError):
    """Too many concurrent transfers, overall or for this owner; try again later."""


@dataclass(frozen=True)
class TransferLimits:
    max_transfers: int = 32  # concurrent DownloadBundle + SubmitDelta streams
    max_per_owner: int = 4
    idle_timeout_s: float = 60.0  # a stream with no message either way for this long is cancelled
    unary_reserve: int = 16  # threads kept for GetJob / GetRoundStatus beyond the transfer slots

    @property
    def workers(self) -> int:
        return self.max_transfers + self.unary_reserve


class TransferGuard:
    def __init__(self, limits: TransferLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits, self.clock = limits, clock
        self._lock = threading.Lock()
        self._per_owner: dict[str, int] = {}
        self._active: dict[int, tuple[grpc.ServicerContext, float]] = {}
        self._next_id = 0
        self._stopped = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="transfer-watchdog", daemon=True)
        self._watchdog.start()

    @contextmanager
    def transfer(self, owner_id: str, context: grpc.ServicerContext) -> Iterator[Callable[[], None]]:
        """A transfer slot for ``owner_id``; the yielded ``touch`` marks progress (call it per message)."""
        with self._lock:
            if len(self._active) >= self.limits.max_transfers:
                raise TooBusyError("too many concurrent transfers; try again later")
            if self._per_owner.get(owner_id, 0) >= self.limits.max_per_owner:
                raise TooBusyError(f"at most {self.limits.max_per_owner} concurrent transfers per owner")
            self._next_id += 1
            slot = self._next_id
            self._active[slot] = (context, self.clock())
            self._per_owner[owner_id] = self._per_owner.get(owner_id, 0) + 1

        def touch() -> None:
            with self._lock:
                if slot in self._active:
                    self._active[slot] = (context, self.clock())

        try:
            yield touch
        finally:
            with self._lock:
                self._active.pop(slot, None)
                self._per_owner[owner_id] -= 1
                if not self._per_owner[owner_id]:
                    del self._per_owner[owner_id]

    def active(self) -> int:
        with self._lock:
            return len(self._active)

    def held_by(self, owner_id: str) -> int:
        with self._lock:
            return self._per_owner.get(owner_id, 0)

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        interval = min(1.0, self.limits.idle_timeout_s / 4)
        while not self._stopped.wait(interval):
            now = self.clock()
            with self._lock:
                idle = [context for context, last in self._active.values()
                        if now - last > self.limits.idle_timeout_s]
            for context in idle:
                context.cancel()  # the stream's blocked read or write ends; its handler releases the slot
