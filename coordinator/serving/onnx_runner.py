"""Placeholder replaced by the ORT runner (being written)."""

from __future__ import annotations

from typing import Any


class OrtRunner:
    def __init__(self, base: Any, cache_dir: Any, *, threads: int = 2) -> None:
        raise NotImplementedError

    def prepare(self, record: Any, tensors: Any) -> None: ...

    def drop(self, adapter_id: str) -> None: ...

    def classify(self, jobs: Any, tokenizer: Any, metrics: Any) -> None: ...
