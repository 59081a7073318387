"""A data owner's view of the marketplace: its own payout lines, fetched over HTTP(S) with a signed request.

The request is ``GET SERVER/v1/market/earnings?month=YYYY-MM`` with :mod:`protos.market_auth`'s headers, signed
with the owner's Ed25519 key; nothing here reaches into the coordinator's code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.errors import ClientError
from protos.documents import Document, DocumentError
from protos.market_auth import earnings_headers

EARNINGS_PATH = "/v1/market/earnings"


class EarningsError(ClientError):
    """The coordinator refused the earnings request or could not be reached; ``status`` is the HTTP status (0:
    no answer)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"earnings request failed ({status or 'no answer'}): {message}")
        self.status = status


@dataclass(frozen=True, kw_only=True)
class EarningsLine(Document):
    listing: str
    owner_id: str
    num_examples: int
    amount_micro: int
    amount: str


@dataclass(frozen=True, kw_only=True)
class Earnings(Document):
    month: str
    owner_id: str
    total_micro: int
    total: str
    lines: list[EarningsLine]


def _message(response: httpx.Response) -> str:
    try:
        body: Any = response.json()
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


def fetch_earnings(server: str, owner_key: Ed25519PrivateKey, owner_id: str, month: str, *,
                   verify: bool | str = True, timeout_s: float = 30.0, now: float | None = None) -> Earnings:
    """The owner's lines of ``month``'s payout statement; raises :class:`EarningsError` on any refusal.

    ``verify`` is httpx's: True (system roots), a CA bundle path, or False (plain-HTTP localhost tests)."""
    headers = earnings_headers(owner_key, owner_id, month, time.time() if now is None else now)
    url = server.rstrip("/") + EARNINGS_PATH
    try:
        response = httpx.get(url, params={"month": month}, headers=headers, verify=verify, timeout=timeout_s)
    except httpx.HTTPError as error:
        raise EarningsError(0, f"{url}: {error}") from error
    if response.status_code != 200:
        raise EarningsError(response.status_code, _message(response))
    try:
        return Earnings.from_json(response.json(), "earnings")
    except (ValueError, DocumentError) as error:
        raise EarningsError(response.status_code, f"malformed answer: {error}") from error
