"""The adapter cache: LRU under a byte budget, never evicting pinned adapters or adapters in use, one load per
adapter however many requests ask for it at once."""

from __future__ import annotations

import threading
import time

import pytest

from coordinator.serving.cache import AdapterCache, CacheFullError


def make_cache(budget: int = 100, size: int = 40, delay: float = 0.0) -> tuple[AdapterCache, list[str], list[str]]:
    loads: list[str] = []
    unloads: list[str] = []

    def load(adapter_id: str) -> int:
        time.sleep(delay)
        loads.append(adapter_id)
        return size

    return AdapterCache(budget, load, unloads.append), loads, unloads


def test_lru_eviction_skips_adapters_in_use_and_pinned() -> None:
    cache, loads, unloads = make_cache()
    cache.acquire("a", 40)
    cache.acquire("b", 40)
    with pytest.raises(CacheFullError):
        cache.acquire("c", 40)  # a and b are both in use
    assert unloads == [] and cache.loaded() == ["a", "b"]
    cache.release("a")
    cache.acquire("c", 40)  # a is the least recently used one not in use
    assert unloads == ["a"] and cache.loaded() == ["b", "c"]
    cache.release("b")
    cache.pin("b")
    cache.release("c")
    cache.acquire("d", 40)  # b is older but pinned: c goes
    assert unloads == ["a", "c"] and set(cache.loaded()) == {"b", "d"}
    cache.acquire("b")  # a hit (the refused "c" counted as a miss too)
    assert cache.stats.hits == 1 and cache.stats.misses == 5 and cache.stats.evictions == 2
    with pytest.raises(CacheFullError):
        cache.evict("b")  # an admin's unload waits for requests in flight
    cache.release("b")
    assert cache.evict("b") and "b" not in cache.loaded()


def test_concurrent_requests_load_an_adapter_once() -> None:
    cache, loads, _ = make_cache(budget=1000, delay=0.2)
    threads = [threading.Thread(target=cache.acquire, args=("a", 40)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == ["a"] and cache.info()["a"].in_use == 6


def test_a_failed_load_leaves_nothing_behind() -> None:
    def load(adapter_id: str) -> int:
        raise ValueError("bad adapter")

    cache = AdapterCache(100, load, lambda adapter_id: None)
    with pytest.raises(ValueError):
        cache.acquire("x", 10)
    assert cache.loaded() == [] and cache.used == 0
