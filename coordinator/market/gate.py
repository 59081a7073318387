"""The marketplace's gate for the serving engine: API keys, access, rate limits, quotas, and metering.

Admission runs in one ``BEGIN IMMEDIATE`` transaction, so concurrent buyers (threads or processes) queue on the
database and never drive a quota below zero: the key and its buyer, the listing, the allow list, the key's
lifetime query budget, its rate-limit bucket, then the day's quota with ``prompt_tokens + max_tokens`` reserved.
The quota change and the request's usage row (status ``pending``; its id is the ticket) commit together. A refused
request writes no usage row and changes no quota; only a request refused by the quota still spends its rate-limit
token, so hammering a spent quota stays throttled. Settlement, also one transaction, writes the final row (actual
tokens, latency, status, price) and gives back the unused part of the reservation. A request that ends in
``error`` (the server's fault) is not billed and its whole reservation is returned.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from coordinator.market.buyers import key_hash, key_owner
from coordinator.market.store import MarketError, MarketStore, Refused, stamp
from coordinator.serving.gate import Admission, GateError, QueryRequest, Settlement

SETTLED = ("ok", "deadline", "error", "cancelled")
MAX_TOKENS_PER_REQUEST = 1 << 20


def bearer_key(authorization: str | None) -> str:
    scheme, _, key = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Refused(401, "unauthorized", "missing API key: send 'Authorization: Bearer KEY'")
    return key.strip()


def price_micro(tokens: int, price_micro_per_1k: int) -> int:
    """What ``tokens`` cost, in micro-units, rounded half up to a whole micro-unit."""
    return (tokens * price_micro_per_1k + 500) // 1000


def _refill(bucket: float, since: float, now: float, rate_per_minute: int, burst: int) -> float:
    return min(float(burst), bucket + max(0.0, now - since) * rate_per_minute / 60.0)


def _check(db: sqlite3.Connection, key: str, listing_id: str) -> tuple[Any, ...]:
    """Every check before the rate limit; returns the row the rest needs or raises :class:`Refused`."""
    row = db.execute(
        "SELECT k.key_hash, k.buyer_id, k.queries, k.bucket, k.bucket_at, b.tokens_per_day, b.requests_per_day, "
        "b.rate_per_minute, b.burst, b.query_budget FROM api_keys k JOIN buyers b USING (buyer_id) "
        "WHERE k.key_hash = ? AND k.status = 'active' AND b.status = 'active'", (key_hash(key),)).fetchone()
    if row is None:
        raise Refused(401, "unauthorized", "invalid or revoked API key")
    listing = db.execute("SELECT status, public, adapter_id, price_micro_per_1k FROM listings WHERE listing_id = ?",
                         (listing_id,)).fetchone()
    if listing is None:
        raise Refused(404, "unknown_model", f"unknown model {listing_id!r}")
    if listing[0] != "listed":
        raise Refused(410, "withdrawn", f"model {listing_id!r} has been withdrawn")
    if not listing[1] and db.execute("SELECT 1 FROM listing_access WHERE listing_id = ? AND buyer_id = ?",
                                     (listing_id, row[1])).fetchone() is None:
        raise Refused(403, "forbidden", f"this key has no access to model {listing_id!r}")
    if row[2] >= row[9]:
        raise Refused(429, "query_budget", f"this key has used its lifetime budget of {row[9]} queries")
    return (*row, listing[2])


def admit_query(store: MarketStore, key: str, listing_id: str, endpoint: str, prompt_tokens: int, max_tokens: int,
                now: float | None = None) -> tuple[int, str]:
    """Admit one query or raise :class:`Refused`; returns ``(usage row id, adapter id)``."""
    if not 0 <= prompt_tokens <= MAX_TOKENS_PER_REQUEST or not 0 <= max_tokens <= MAX_TOKENS_PER_REQUEST:
        raise Refused(400, "bad_request", "prompt_tokens and max_tokens must be between 0 and 2^20")
    moment = now or time.time()
    day, reserve = datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d"), prompt_tokens + max_tokens
    refusal: Refused | None = None
    with store.transaction() as db:
        digest, buyer, _, bucket, since, tokens_day, requests_day, rate, burst, _, adapter = _check(db, key, listing_id)
        level = _refill(bucket, since, moment, rate, burst)
        if level < 1.0:
            wait = (1.0 - level) * 60.0 / rate
            raise Refused(429, "rate_limited", f"rate limit: {rate} requests a minute; retry in {wait:.1f} s")
        db.execute("UPDATE api_keys SET bucket = ?, bucket_at = ? WHERE key_hash = ?", (level - 1.0, moment, digest))
        used = db.execute("SELECT requests, tokens FROM daily_quota WHERE buyer_id = ? AND day = ?",
                          (buyer, day)).fetchone() or (0, 0)
        if used[0] + 1 > requests_day:
            refusal = Refused(429, "quota", f"daily request quota of {requests_day} used up")
        elif used[1] + reserve > tokens_day:
            refusal = Refused(429, "quota", f"daily token quota: {tokens_day - used[1]} of {tokens_day} left, "
                                            f"this request may use {reserve}")
        else:  # the quota change and the usage row: one transaction
            db.execute("INSERT INTO daily_quota VALUES (?, ?, 1, ?) ON CONFLICT (buyer_id, day) DO UPDATE SET "
                       "requests = requests + 1, tokens = tokens + excluded.tokens", (buyer, day, reserve))
            db.execute("UPDATE api_keys SET queries = queries + 1 WHERE key_hash = ?", (digest,))
            usage_id = db.execute(
                "INSERT INTO usage (buyer_id, listing_id, key_id, endpoint, day, admitted_at, reserved_tokens) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (buyer, listing_id, digest[:16], endpoint, day, stamp(moment),
                                                 reserve)).lastrowid
    if refusal is not None:  # committed the spent rate-limit token only
        raise refusal
    assert usage_id is not None
    return int(usage_id), str(adapter)


def settle_query(store: MarketStore, usage_id: int, tokens_in: int, tokens_out: int, latency_s: float, status: str,
                 now: float | None = None) -> int:
    """Write the request's final usage row and refund the unused reservation; returns the price in micro-units."""
    if status not in SETTLED:
        raise MarketError(f"settlement status must be one of {', '.join(SETTLED)}, got {status!r}")
    with store.transaction() as db:
        row = db.execute("SELECT u.buyer_id, u.day, u.reserved_tokens, u.status, l.price_micro_per_1k, "
                         "b.tokens_per_day FROM usage u JOIN listings l USING (listing_id) JOIN buyers b "
                         "USING (buyer_id) WHERE u.usage_id = ?", (usage_id,)).fetchone()
        if row is None:
            raise MarketError(f"usage row {usage_id} does not exist")
        buyer, day, reserved, current, price_per_1k, tokens_day = row
        if current != "pending":
            raise MarketError(f"usage row {usage_id} is already settled ({current})")
        used = 0 if status == "error" else max(0, tokens_in) + max(0, tokens_out)
        price = 0 if status == "error" else price_micro(used, price_per_1k)
        db.execute("UPDATE daily_quota SET tokens = MAX(0, MIN(?, tokens - ? + ?)) WHERE buyer_id = ? AND day = ?",
                   (max(tokens_day, 0), reserved, used, buyer, day))
        db.execute("UPDATE usage SET settled_at = ?, tokens_in = ?, tokens_out = ?, latency_ms = ?, status = ?, "
                   "price_micro = ? WHERE usage_id = ?",
                   (stamp(now or time.time()), max(0, tokens_in), max(0, tokens_out),
                    round(max(0.0, latency_s) * 1000), status, price, usage_id))
    return int(price)


def release_pending(store: MarketStore, admitted_before: float, now: float | None = None) -> int:
    """Close the usage rows of requests admitted before ``admitted_before`` and never settled (a server killed
    mid-request: such a request got no answer, since settlement precedes the answer's last byte) as
    ``abandoned``, unbilled, their reservations returned. Call it when the server starts; returns how many."""
    with store.transaction() as db:
        rows = db.execute("SELECT usage_id, buyer_id, day, reserved_tokens FROM usage WHERE status = 'pending' AND "
                          "admitted_at < ?", (stamp(admitted_before),)).fetchall()
        for usage_id, buyer, day, reserved in rows:
            db.execute("UPDATE daily_quota SET tokens = MAX(0, tokens - ?) WHERE buyer_id = ? AND day = ?",
                       (reserved, buyer, day))
            db.execute("UPDATE usage SET status = 'abandoned', settled_at = ? WHERE usage_id = ?",
                       (stamp(now or time.time()), usage_id))
    return len(rows)


def visible_listings(store: MarketStore, authorization: str | None) -> list[str]:
    """Listed public listings, plus the allow-listed ones of a valid key's buyer."""
    public = [r[0] for r in store.query("SELECT listing_id FROM listings WHERE status = 'listed' AND public = 1")]
    try:
        found = key_owner(store, bearer_key(authorization))
    except Refused:
        found = None
    if found is None:
        return sorted(public)
    private = [r[0] for r in store.query("SELECT a.listing_id FROM listing_access a JOIN listings l USING "
                                         "(listing_id) WHERE a.buyer_id = ? AND l.status = 'listed'", found[0])]
    return sorted(set(public) | set(private))


class MarketGate:
    """:class:`coordinator.serving.gate.QueryGate` over a :class:`MarketStore`: ``model`` is a listing id."""

    def __init__(self, store: MarketStore, clock: Callable[[], float] = time.time) -> None:
        self.store, self.clock = store, clock

    def admit(self, request: QueryRequest) -> Admission:
        try:
            key = bearer_key(request.authorization)
            usage_id, adapter = admit_query(self.store, key, request.model, request.endpoint,
                                            request.prompt_tokens, request.max_tokens, self.clock())
        except Refused as refused:
            raise GateError(refused.status, refused.message, code=refused.code) from refused
        return Admission(adapter_id=adapter, ticket=str(usage_id), details={"listing": request.model})

    def settle(self, admission: Admission, settlement: Settlement) -> None:
        settle_query(self.store, int(admission.ticket), settlement.tokens_in, settlement.tokens_out,
                     settlement.latency_s, settlement.status, self.clock())

    def visible_models(self, authorization: str | None) -> list[str]:
        return visible_listings(self.store, authorization)
