"""Money out of the usage rows: buyers' usage and monthly statements, and data owners' monthly payouts.

A listing's revenue in a month is the sum of its settled usage rows' prices (settled in that month, UTC). Its
owners' pool is ``revenue * owner_share`` (integer micro-units, rounded down: the platform keeps the fraction),
split among its contributing owners in proportion to their summed signed ``num_examples`` by the largest-remainder
method, so the lines add up to the pool exactly, to the micro-unit. ``make_payouts`` writes the statement as
JSON and CSV under ``STATE/market/payouts/`` and records it (with its sha256) in the database and the audit log in
one transaction; a month is paid out once, after it has ended.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from coordinator.errors import InvalidSettingError
from coordinator.market import audit
from coordinator.market.store import MICRO, MarketError, MarketStore, from_micro, stamp
from protos.crypto import sha256_hex
from protos.documents import Document
from protos.files import atomic_write

MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])\Z")
PAYOUTS_DIR = Path("market") / "payouts"  # under the state directory
USAGE_FIELDS = ("usage_id", "buyer", "listing", "endpoint", "admitted_at", "settled_at", "tokens_in", "tokens_out",
                "latency_ms", "status", "price_micro")
USAGE_COLUMNS = ", ".join(USAGE_FIELDS).replace("buyer,", "buyer_id,").replace("listing,", "listing_id,")


@dataclass(frozen=True, kw_only=True)
class UsageRow(Document):
    usage_id: int
    buyer: str
    listing: str
    endpoint: str
    admitted_at: str
    settled_at: str
    tokens_in: int
    tokens_out: int
    latency_ms: int
    status: str
    price_micro: int


@dataclass(frozen=True, kw_only=True)
class StatementLine(Document):
    listing: str
    requests: int
    tokens_in: int
    tokens_out: int
    amount_micro: int


@dataclass(frozen=True, kw_only=True)
class BuyerStatement(Document):
    buyer: str
    month: str
    lines: list[StatementLine]
    total_micro: int


@dataclass(frozen=True, kw_only=True)
class PayoutLine(Document):
    listing: str
    owner_id: str
    num_examples: int
    amount_micro: int


@dataclass(frozen=True, kw_only=True)
class ListingRevenue(Document):
    listing: str
    revenue_micro: int
    owner_share_ppm: int
    owners_micro: int  # the pool split among the listing's owners
    platform_micro: int


@dataclass(frozen=True, kw_only=True)
class PayoutStatement(Document):
    month: str
    created: str
    listings: list[ListingRevenue]
    lines: list[PayoutLine]
    revenue_micro: int
    owners_micro: int
    platform_micro: int

    def lines_of(self, owner_id: str) -> list[PayoutLine]:
        return [line for line in self.lines if line.owner_id == owner_id]


def month_bounds(month: str) -> tuple[str, str]:
    """``"2026-02"`` -> the ISO timestamps of its first instant and of the next month's (UTC)."""
    if not MONTH.match(month):
        raise InvalidSettingError(f"{{month}} must be YYYY-MM, got {month!r}")
    year, number = int(month[:4]), int(month[5:])
    start = datetime(year, number, 1, tzinfo=UTC)
    end = datetime(year + number // 12, number % 12 + 1, 1, tzinfo=UTC)
    return stamp(start.timestamp()), stamp(end.timestamp())


def usage_rows(store: MarketStore, buyer: str | None = None, since: str = "", until: str = "9999") -> list[UsageRow]:
    """Settled usage rows (settled at or after ``since``, before ``until``: ISO dates or timestamps), oldest first."""
    rows = store.query(f"SELECT {USAGE_COLUMNS} FROM usage WHERE status != 'pending' AND settled_at >= ? AND "
                       "settled_at < ? AND (? IS NULL OR buyer_id = ?) ORDER BY usage_id", since, until, buyer, buyer)
    return [UsageRow(**dict(zip(USAGE_FIELDS, row, strict=True))) for row in rows]


def usage_csv(rows: list[UsageRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(USAGE_FIELDS)
    writer.writerows([[getattr(row, name) for name in USAGE_FIELDS] for row in rows])
    return out.getvalue()


def buyer_statement(store: MarketStore, buyer: str, month: str) -> BuyerStatement:
    start, end = month_bounds(month)
    totals: dict[str, list[int]] = {}
    for row in usage_rows(store, buyer, start, end):
        line = totals.setdefault(row.listing, [0, 0, 0, 0])
        for i, value in enumerate((1, row.tokens_in, row.tokens_out, row.price_micro)):
            line[i] += value
    lines = [StatementLine(listing=name, requests=v[0], tokens_in=v[1], tokens_out=v[2], amount_micro=v[3])
             for name, v in sorted(totals.items())]
    return BuyerStatement(buyer=buyer, month=month, lines=lines, total_micro=sum(x.amount_micro for x in lines))


def split(pool: int, weights: dict[str, int]) -> dict[str, int]:
    """``pool`` in proportion to ``weights``, in integers that sum to ``pool`` exactly (largest remainder; ties go
    to the smaller id). Zero total weight: nobody gets anything."""
    total = sum(weights.values())
    if pool <= 0 or total <= 0:
        return {owner: 0 for owner in weights}
    shares = {owner: pool * weight // total for owner, weight in weights.items()}
    left = pool - sum(shares.values())
    by_remainder = sorted(weights, key=lambda owner: (-(pool * weights[owner] % total), owner))
    for owner in by_remainder[:left]:
        shares[owner] += 1
    return shares


def compute_payouts(month: str, revenue: dict[str, tuple[int, int, dict[str, int]]], created: str) -> PayoutStatement:
    """Pure: ``revenue`` is ``{listing: (revenue micro, owner share ppm, {owner: num_examples})}``."""
    listings, lines = [], []
    for listing, (earned, share_ppm, owners) in sorted(revenue.items()):
        pool = earned * share_ppm // MICRO if sum(owners.values()) > 0 else 0
        for owner, amount in sorted(split(pool, owners).items()):
            lines.append(PayoutLine(listing=listing, owner_id=owner, num_examples=owners[owner], amount_micro=amount))
        listings.append(ListingRevenue(listing=listing, revenue_micro=earned, owner_share_ppm=share_ppm,
                                       owners_micro=pool, platform_micro=earned - pool))
    total = sum(x.revenue_micro for x in listings)
    owners_total = sum(x.amount_micro for x in lines)
    return PayoutStatement(month=month, created=created, listings=listings, lines=lines, revenue_micro=total,
                           owners_micro=owners_total, platform_micro=total - owners_total)


def payout_statement(store: MarketStore, month: str) -> PayoutStatement | None:
    month_bounds(month)
    rows = store.query("SELECT statement FROM payouts WHERE month = ?", month)
    return PayoutStatement.from_json(json.loads(rows[0][0]), f"payouts {month}") if rows else None


def payout_csv(statement: PayoutStatement) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["month", "listing", "owner_id", "num_examples", "amount_micro", "amount"])
    for line in statement.lines:
        writer.writerow([statement.month, line.listing, line.owner_id, line.num_examples, line.amount_micro,
                         from_micro(line.amount_micro)])
    return out.getvalue()


def make_payouts(store: MarketStore, month: str, actor: str, now: float | None = None) -> tuple[PayoutStatement, Path]:
    """Compute, write (JSON + CSV) and record the month's payouts; returns the statement and the JSON's path. A
    month already paid out returns its recorded statement; a month not yet over is refused."""
    start, end = month_bounds(month)
    moment = now or time.time()
    path = store.dir / PAYOUTS_DIR / f"{month}.json"
    if stamp(moment) < end:
        raise MarketError(f"{month} is not over yet (payouts run once a month has ended, after {end})")
    if (existing := payout_statement(store, month)) is not None:
        return existing, path
    earned = {r[0]: int(r[1]) for r in store.query(
        "SELECT listing_id, SUM(price_micro) FROM usage WHERE status != 'pending' AND settled_at >= ? AND "
        "settled_at < ? GROUP BY listing_id", start, end)}
    revenue = {listing: (amount, store.listing(listing).owner_share_ppm, store.listing_owners(listing))
               for listing, amount in earned.items()}
    statement = compute_payouts(month, revenue, stamp(moment))
    body = json.dumps(statement.to_json(), indent=2) + "\n"
    atomic_write(path, body)
    atomic_write(path.with_suffix(".csv"), payout_csv(statement))
    with store.transaction() as db:
        db.execute("INSERT INTO payouts VALUES (?, ?, ?, ?)", (month, body, sha256_hex(body.encode()), stamp(moment)))
        audit.append(db, time=stamp(moment), actor=actor, action="payouts",
                     details={"month": month, "sha256": sha256_hex(body.encode()), "lines": len(statement.lines),
                              "revenue_micro": statement.revenue_micro, "owners_micro": statement.owners_micro})
    return statement, path
