"""Buyers and their API keys: create, revoke, rotate, look up.

A key is ``osk_`` and 32 random bytes (url-safe base64), shown once; the store keeps only its sha256, so the
database never holds a usable key (256 bits of entropy make a salt or a slow hash pointless). Each key has its
own rate-limit bucket and lifetime query count: rotation starts both afresh, and the old key is refused from
the next admission on. Revoking a buyer refuses all its keys.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from coordinator.errors import InvalidSettingError, NotFoundError
from coordinator.market import audit
from coordinator.market.store import BUYER_ID, MarketError, MarketStore, stamp

KEY_PREFIX = "osk_"


@dataclass(frozen=True)
class Limits:
    tokens_per_day: int = 100_000
    requests_per_day: int = 1_000
    rate_per_minute: int = 60  # the key's token bucket refills this many requests a minute ...
    burst: int = 10  # ... and holds at most this many
    query_budget: int = 100_000  # admitted queries over a key's lifetime: bounds model-extraction attempts

    def __post_init__(self) -> None:
        for name in ("tokens_per_day", "requests_per_day", "rate_per_minute", "burst", "query_budget"):
            if getattr(self, name) < (1 if name in ("rate_per_minute", "burst") else 0):
                raise InvalidSettingError(f"{{{name}}} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class Buyer:
    buyer_id: str
    status: str  # active | revoked
    limits: Limits
    created_at: str


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def buyer_row(db: sqlite3.Connection, buyer_id: str) -> tuple[Any, ...]:
    row = db.execute("SELECT buyer_id, status, tokens_per_day, requests_per_day, rate_per_minute, burst, "
                     "query_budget, created_at FROM buyers WHERE buyer_id = ?", (buyer_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"buyer {buyer_id!r} does not exist")
    return tuple(row)


def _insert_key(db: sqlite3.Connection, buyer_id: str, burst: int, now: float) -> str:
    key = new_key()
    db.execute("INSERT INTO api_keys VALUES (?, ?, 'active', 0, ?, ?, ?)",
               (key_hash(key), buyer_id, float(burst), now, stamp(now)))
    return key


def add_buyer(store: MarketStore, buyer_id: str, limits: Limits, listings: list[str], actor: str,
              now: float | None = None) -> str:
    """Create a buyer with access to ``listings`` (beyond public ones); returns its API key, shown once."""
    if not BUYER_ID.match(buyer_id):
        raise InvalidSettingError(f"{{name}} {buyer_id!r}: use letters, digits, '.', '_', '@' or '-' (at most 64)")
    moment = now or time.time()
    with store.transaction() as db:
        if db.execute("SELECT 1 FROM buyers WHERE buyer_id = ?", (buyer_id,)).fetchone():
            raise MarketError(f"buyer {buyer_id!r} already exists")
        db.execute("INSERT INTO buyers VALUES (?, 'active', ?, ?, ?, ?, ?, ?, ?)",
                   (buyer_id, limits.tokens_per_day, limits.requests_per_day, limits.rate_per_minute,
                    limits.burst, limits.query_budget, stamp(moment), stamp(moment)))
        for listing_id in listings:
            if not db.execute("SELECT 1 FROM listings WHERE listing_id = ?", (listing_id,)).fetchone():
                raise NotFoundError(f"listing {listing_id!r} does not exist")
            db.execute("INSERT OR IGNORE INTO listing_access VALUES (?, ?)", (listing_id, buyer_id))
        key = _insert_key(db, buyer_id, limits.burst, moment)
        audit.append(db, time=stamp(moment), actor=actor, action="buyer.add",
                     details={"buyer": buyer_id, "key_id": key_hash(key)[:16], "listings": sorted(set(listings)),
                              "tokens_per_day": limits.tokens_per_day, "requests_per_day": limits.requests_per_day,
                              "rate_per_minute": limits.rate_per_minute, "query_budget": limits.query_budget})
    return key


def buyer(store: MarketStore, buyer_id: str) -> Buyer:
    with store.reading() as db:
        row = buyer_row(db, buyer_id)
    return Buyer(row[0], row[1], Limits(*row[2:7]), row[7])


def buyers(store: MarketStore) -> list[Buyer]:
    return [buyer(store, r[0]) for r in store.query("SELECT buyer_id FROM buyers ORDER BY buyer_id")]


def revoke_buyer(store: MarketStore, buyer_id: str, actor: str, now: float | None = None) -> None:
    """Refuse the buyer's keys from the next admission on (requests already admitted still settle)."""
    moment = stamp(now or time.time())
    with store.transaction() as db:
        if buyer_row(db, buyer_id)[1] == "revoked":
            raise MarketError(f"buyer {buyer_id!r} is already revoked")
        db.execute("UPDATE buyers SET status = 'revoked', updated_at = ? WHERE buyer_id = ?", (moment, buyer_id))
        db.execute("UPDATE api_keys SET status = 'revoked' WHERE buyer_id = ? AND status = 'active'", (buyer_id,))
        audit.append(db, time=moment, actor=actor, action="buyer.revoke", details={"buyer": buyer_id})


def rotate_key(store: MarketStore, buyer_id: str, actor: str, now: float | None = None) -> str:
    """A new API key for an active buyer; the old one is refused from now on. Returns the new key, shown once."""
    moment = now or time.time()
    with store.transaction() as db:
        row = buyer_row(db, buyer_id)
        if row[1] != "active":
            raise MarketError(f"buyer {buyer_id!r} is revoked; add a new buyer instead")
        old = [r[0][:16] for r in db.execute("SELECT key_hash FROM api_keys WHERE buyer_id = ? AND status = "
                                             "'active'", (buyer_id,))]
        db.execute("UPDATE api_keys SET status = 'rotated' WHERE buyer_id = ? AND status = 'active'", (buyer_id,))
        key = _insert_key(db, buyer_id, int(row[5]), moment)
        audit.append(db, time=stamp(moment), actor=actor, action="key.rotate",
                     details={"buyer": buyer_id, "key_id": key_hash(key)[:16], "retired": old})
    return key


def key_owner(store: MarketStore, key: str) -> tuple[str, str] | None:
    """``(buyer id, key hash)`` of an active key of an active buyer, else None."""
    digest = key_hash(key)
    rows = store.query("SELECT k.key_hash, k.buyer_id FROM api_keys k JOIN buyers b USING (buyer_id) WHERE "
                       "k.key_hash = ? AND k.status = 'active' AND b.status = 'active'", digest)
    if not rows or not hmac.compare_digest(rows[0][0], digest):
        return None
    return str(rows[0][1]), str(rows[0][0])
