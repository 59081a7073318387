"""The marketplace's records: one SQLite file, ``STATE/market.db`` (WAL, ``BEGIN IMMEDIATE`` for every write).

Listings (an adapter id, a card, a price in integer micro-units per 1,000 tokens, the owners' revenue share in
parts per million, public or an allow list) with their contributing owners; buyers with daily quotas, a per-key
rate limit and a per-key lifetime query budget; API keys, stored only as the sha256 of a 256-bit random key;
usage rows, one per admitted request (:mod:`coordinator.market.gate` writes them with the quota change in one
transaction); payout statements; the audit log (:mod:`coordinator.market.audit`). Money is always an integer
number of micro-units (1 unit = 1,000,000 micro), so sums never drift.
"""

from __future__ import annotations

import getpass
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from coordinator.errors import CoordinatorError, InvalidSettingError, NotFoundError
from coordinator.market import audit
from protos.files import utc_timestamp

DB_FILE = "market.db"
MICRO = 1_000_000
LISTING_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")
BUYER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")

SCHEMA = """
CREATE TABLE IF NOT EXISTS listings (
    listing_id TEXT PRIMARY KEY, adapter_id TEXT NOT NULL, name TEXT NOT NULL, job_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('listed', 'withdrawn')), public INTEGER NOT NULL,
    price_micro_per_1k INTEGER NOT NULL CHECK (price_micro_per_1k >= 0),
    owner_share_ppm INTEGER NOT NULL CHECK (owner_share_ppm BETWEEN 0 AND 1000000),
    card TEXT NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS listing_owners (
    listing_id TEXT NOT NULL REFERENCES listings(listing_id), owner_id TEXT NOT NULL,
    num_examples INTEGER NOT NULL CHECK (num_examples >= 0), PRIMARY KEY (listing_id, owner_id));
CREATE TABLE IF NOT EXISTS buyers (
    buyer_id TEXT PRIMARY KEY, status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    tokens_per_day INTEGER NOT NULL, requests_per_day INTEGER NOT NULL, rate_per_minute INTEGER NOT NULL,
    burst INTEGER NOT NULL, query_budget INTEGER NOT NULL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY, buyer_id TEXT NOT NULL REFERENCES buyers(buyer_id),
    status TEXT NOT NULL CHECK (status IN ('active', 'rotated', 'revoked')),
    queries INTEGER NOT NULL DEFAULT 0,          -- admitted over the key's lifetime: the extraction budget
    bucket REAL NOT NULL, bucket_at REAL NOT NULL,  -- the key's rate-limit token bucket and when it was filled
    created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS listing_access (
    listing_id TEXT NOT NULL REFERENCES listings(listing_id), buyer_id TEXT NOT NULL REFERENCES buyers(buyer_id),
    PRIMARY KEY (listing_id, buyer_id));
CREATE TABLE IF NOT EXISTS daily_quota (
    buyer_id TEXT NOT NULL, day TEXT NOT NULL, requests INTEGER NOT NULL CHECK (requests >= 0),
    tokens INTEGER NOT NULL CHECK (tokens >= 0), PRIMARY KEY (buyer_id, day));
CREATE TABLE IF NOT EXISTS usage (
    usage_id INTEGER PRIMARY KEY AUTOINCREMENT, buyer_id TEXT NOT NULL, listing_id TEXT NOT NULL,
    key_id TEXT NOT NULL, endpoint TEXT NOT NULL, day TEXT NOT NULL, admitted_at TEXT NOT NULL, settled_at TEXT,
    reserved_tokens INTEGER NOT NULL, tokens_in INTEGER NOT NULL DEFAULT 0, tokens_out INTEGER NOT NULL DEFAULT 0,
    latency_ms INTEGER NOT NULL DEFAULT 0, status TEXT NOT NULL DEFAULT 'pending',
    price_micro INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS usage_by_buyer ON usage (buyer_id, settled_at);
CREATE INDEX IF NOT EXISTS usage_by_listing ON usage (listing_id, settled_at);
CREATE TABLE IF NOT EXISTS payouts (
    month TEXT PRIMARY KEY, statement TEXT NOT NULL, sha256 TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS earnings_nonces (
    owner_id TEXT NOT NULL, nonce TEXT NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (owner_id, nonce));
"""


class MarketError(CoordinatorError):
    """A marketplace operation cannot be done; the message names the listing, buyer or field."""


class Refused(MarketError):
    """A query refused at admission: ``status`` is the HTTP status, ``code`` a short machine-readable reason."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Listing:
    listing_id: str
    adapter_id: str
    name: str
    job_id: str
    status: str  # listed | withdrawn
    public: bool
    price_micro_per_1k: int
    owner_share_ppm: int
    card: str  # the card's JSON (coordinator.market.listings.ListingCard)
    created_at: str


def to_micro(amount: str | int | Decimal, field: str = "price") -> int:
    """``"0.02"`` -> 20000, exactly (no float on the way); refuses negatives and sub-micro precision."""
    try:
        value = Decimal(str(amount)) * MICRO
    except InvalidOperation as error:
        raise InvalidSettingError(f"{{{field}}} must be a decimal number, got {amount!r}") from error
    if value < 0 or value != value.to_integral_value():
        raise InvalidSettingError(f"{{{field}}} must be >= 0 with at most 6 decimals, got {amount!r}")
    return int(value)


def to_ppm(fraction: str | Decimal, field: str = "owner_share") -> int:
    """A fraction in [0, 1] as integer parts per million: ``"0.7"`` -> 700000."""
    ppm = to_micro(fraction, field)
    if ppm > MICRO:
        raise InvalidSettingError(f"{{{field}}} must be a fraction between 0 and 1, got {fraction!r}")
    return ppm


def from_micro(micro: int) -> str:
    return str((Decimal(micro) / MICRO).quantize(Decimal("0.000001")))


def os_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return "unknown"


def stamp(now: float) -> str:
    return utc_timestamp(datetime.fromtimestamp(now, UTC))


class MarketStore:
    def __init__(self, state_dir: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.dir / DB_FILE, check_same_thread=False, isolation_level=None,
                                   timeout=busy_timeout_s)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA + audit.AUDIT_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (``BEGIN IMMEDIATE``): concurrent writers queue, never interleave."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        with self.reading() as db:
            return list(db.execute(sql, args).fetchall())

    # -- audit ----------------------------------------------------------------------------------------------
    def audit(self, actor: str, action: str, details: dict[str, Any], now: float | None = None) -> audit.AuditEntry:
        with self.transaction() as db:
            return audit.append(db, time=stamp(now or time.time()), actor=actor, action=action, details=details)

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, for reads (``audit.verify(db)``, ``audit.head(db)``), under this store's lock."""
        with self._lock:
            yield self._db

    # -- listings -------------------------------------------------------------------------------------------
    def add_listing(self, listing: Listing, owners: dict[str, int], allow: list[str], actor: str,
                    events: list[tuple[str, dict[str, Any]]], now: float | None = None) -> Listing:
        """Insert a listing, its contributing owners and allow list; ``events`` are audit entries (the listing
        itself, a gate override) written in the same transaction."""
        if not LISTING_ID.match(listing.listing_id):
            raise InvalidSettingError(f"{{listing_id}} {listing.listing_id!r}: use lowercase letters, digits, '.', "
                                      "'_' or '-' (at most 64)")
        moment = stamp(now or time.time())
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM listings WHERE listing_id = ?", (listing.listing_id,)).fetchone():
                raise MarketError(f"listing {listing.listing_id!r} already exists")
            db.execute("INSERT INTO listings VALUES (?, ?, ?, ?, 'listed', ?, ?, ?, ?, ?, ?)",
                       (listing.listing_id, listing.adapter_id, listing.name, listing.job_id, int(listing.public),
                        listing.price_micro_per_1k, listing.owner_share_ppm, listing.card, moment, moment))
            db.executemany("INSERT INTO listing_owners VALUES (?, ?, ?)",
                           [(listing.listing_id, owner, count) for owner, count in sorted(owners.items())])
            for buyer_id in allow:
                if not db.execute("SELECT 1 FROM buyers WHERE buyer_id = ?", (buyer_id,)).fetchone():
                    raise NotFoundError(f"buyer {buyer_id!r} does not exist")
                db.execute("INSERT OR IGNORE INTO listing_access VALUES (?, ?)", (listing.listing_id, buyer_id))
            for action, details in events:
                audit.append(db, time=moment, actor=actor, action=action, details=details)
        return self.listing(listing.listing_id)

    def withdraw(self, listing_id: str, actor: str, now: float | None = None) -> Listing:
        """Unlist: refused from the next admission on; requests already admitted still settle."""
        moment = stamp(now or time.time())
        with self.transaction() as db:
            if db.execute("UPDATE listings SET status = 'withdrawn', updated_at = ? WHERE listing_id = ? AND "
                          "status = 'listed'", (moment, listing_id)).rowcount != 1:
                raise NotFoundError(f"listing {listing_id!r} does not exist or is already withdrawn")
            audit.append(db, time=moment, actor=actor, action="listing.withdraw", details={"listing": listing_id})
        return self.listing(listing_id)

    def listing(self, listing_id: str) -> Listing:
        rows = self.query("SELECT listing_id, adapter_id, name, job_id, status, public, price_micro_per_1k, "
                          "owner_share_ppm, card, created_at FROM listings WHERE listing_id = ?", listing_id)
        if not rows:
            raise NotFoundError(f"listing {listing_id!r} does not exist")
        row = rows[0]
        return Listing(row[0], row[1], row[2], row[3], row[4], bool(row[5]), *row[6:])

    def listings(self, *, include_withdrawn: bool = False) -> list[Listing]:
        where = "" if include_withdrawn else " WHERE status = 'listed'"
        return [self.listing(r[0]) for r in self.query(f"SELECT listing_id FROM listings{where} ORDER BY listing_id")]

    def listing_owners(self, listing_id: str) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self.query("SELECT owner_id, num_examples FROM listing_owners WHERE "
                                                    "listing_id = ? ORDER BY owner_id", listing_id)}

    def allowed(self, listing_id: str) -> list[str]:
        return [r[0] for r in self.query("SELECT buyer_id FROM listing_access WHERE listing_id = ? ORDER BY "
                                         "buyer_id", listing_id)]
