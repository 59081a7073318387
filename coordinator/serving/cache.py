"""The adapter cache: adapters load on demand up to a memory budget and leave least recently used first; pinned
adapters and adapters with requests in flight are never evicted."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.errors import CoordinatorError


class CacheFullError(CoordinatorError):
    """Every loaded adapter is pinned or in use and the budget has no room for another."""


@dataclass
class Entry:
    size: int
    pinned: bool = False
    in_use: int = 0  # requests admitted and not yet finished
    ready: threading.Event = field(default_factory=threading.Event)  # set once loaded (or failed and removed)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class AdapterCache:
    """``load(id) -> size in bytes`` and ``unload(id)`` do the work; the cache decides when."""

    def __init__(self, budget_bytes: int, load: Callable[[str], int], unload: Callable[[str], None],
                 on_event: Callable[[str, str], None] | None = None) -> None:
        self.budget = budget_bytes
        self._load, self._unload = load, unload
        self._on_event = on_event or (lambda event, adapter_id: None)
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self._lock = threading.RLock()
        self.stats = CacheStats()

    @property
    def used(self) -> int:
        return sum(e.size for e in self._entries.values())

    def loaded(self) -> list[str]:
        with self._lock:
            return [k for k, v in self._entries.items() if v.ready.is_set()]

    def info(self) -> dict[str, Entry]:
        with self._lock:
            return {k: Entry(v.size, v.pinned, v.in_use) for k, v in self._entries.items() if v.ready.is_set()}

    def _evict_for(self, size: int) -> None:
        for adapter_id in list(self._entries):
            if self.used + size <= self.budget:
                return
            entry = self._entries[adapter_id]
            if entry.pinned or entry.in_use:
                continue
            self._unload(adapter_id)
            del self._entries[adapter_id]
            self.stats.evictions += 1
            self._on_event("eviction", adapter_id)
        if self.used + size > self.budget:
            raise CacheFullError(f"the adapter cache ({self.budget >> 20} MiB) is full of pinned or busy adapters")

    def acquire(self, adapter_id: str, size_hint: int = 0) -> None:
        """Load if needed and mark one request in flight; pair with :meth:`release`. The load runs outside the
        cache's lock (an ONNX export can take a while), so other adapters keep being served meanwhile."""
        while True:
            with self._lock:
                entry = self._entries.get(adapter_id)
                if entry is not None and entry.ready.is_set():
                    self._entries.move_to_end(adapter_id)
                    entry.in_use += 1
                    self.stats.hits += 1
                    self._on_event("hit", adapter_id)
                    return
                if entry is None:
                    self.stats.misses += 1
                    self._on_event("miss", adapter_id)
                    self._evict_for(size_hint)
                    entry = self._entries[adapter_id] = Entry(size_hint, in_use=1)
                    break
                loading = entry.ready
            loading.wait()  # another request is loading it: then take it as a hit (or load it if that failed)
        try:
            size = self._load(adapter_id)
        except BaseException:
            with self._lock:
                del self._entries[adapter_id]
            entry.ready.set()
            raise
        with self._lock:
            entry.size = size
            entry.ready.set()
            if self.used > self.budget:  # the hint was short: make room now, never evicting this one
                self._evict_for(0)

    def release(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is not None and entry.in_use > 0:
                entry.in_use -= 1

    def pin(self, adapter_id: str, pinned: bool = True, size_hint: int = 0) -> None:
        with self._lock:
            if adapter_id not in self._entries:
                self.acquire(adapter_id, size_hint)
                self.release(adapter_id)
            self._entries[adapter_id].pinned = pinned

    def evict(self, adapter_id: str) -> bool:
        """Unload now (an admin's unload); refused while requests use it."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                return False
            if entry.in_use:
                raise CacheFullError(f"adapter {adapter_id!r} has {entry.in_use} requests in flight")
            self._unload(adapter_id)
            del self._entries[adapter_id]
            self._on_event("unload", adapter_id)
            return True
