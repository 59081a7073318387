"""The serving engine's admission hook: who may query which adapter, and how each answered request is settled.

The HTTP server calls ``admit`` before it reads anything but the request's small JSON body, and ``settle`` once
the answer is complete (before the last byte is sent), so a request that got an answer is always settled. Without
a gate the server serves adapter ids directly (the model owner's own use on a private port). The marketplace's
gate maps listing ids to adapter ids, checks keys, access, quotas and rate limits, and meters usage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class GateError(Exception):
    """A request refused at the gate: ``status`` is the HTTP status, ``message`` is safe to show the caller."""

    def __init__(self, status: int, message: str, *, code: str = "refused") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code  # a short machine-readable reason: "unauthorized", "quota", "rate_limited", ...


@dataclass(frozen=True)
class QueryRequest:
    """What the gate sees of a request: the bearer token, the public model name asked for, and its size."""

    authorization: str | None  # the raw Authorization header ("Bearer KEY"), or None
    model: str  # the request's ``model``: an adapter id, or a listing id behind a marketplace
    endpoint: str  # "completions", "chat", "classify"
    prompt_tokens: int
    max_tokens: int  # the most tokens the answer may have (0 for classification)


@dataclass(frozen=True)
class Admission:
    """A request let through: the adapter to run and what to settle later."""

    adapter_id: str
    ticket: str = ""  # the gate's own reference (a usage row id, say); opaque to the server
    max_top_k: int = 5  # classification answers carry at most this many labels
    round_probabilities: int = 3  # decimals of the probabilities in answers
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Settlement:
    tokens_in: int
    tokens_out: int
    latency_s: float
    status: str  # "ok", "deadline", "error", "cancelled"


class QueryGate(Protocol):
    def admit(self, request: QueryRequest) -> Admission:
        """Let the request through or raise :class:`GateError` (nothing is metered for a refusal)."""
        ...

    def settle(self, admission: Admission, settlement: Settlement) -> None:
        """Record what the admitted request used; called exactly once per admission, answered or not."""
        ...

    def visible_models(self, authorization: str | None) -> list[str]:
        """The model names ``GET /v1/models`` shows this caller."""
        ...
