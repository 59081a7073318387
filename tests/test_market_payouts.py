"""Revenue shares: split by signed num_examples, in integer micro-units that add up exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from coordinator.market import audit
from coordinator.market.buyers import Limits, add_buyer
from coordinator.market.gate import admit_query, settle_query
from coordinator.market.payouts import buyer_statement, compute_payouts, make_payouts, payout_statement, split
from coordinator.market.store import Listing, MarketError, MarketStore, to_micro, to_ppm

MAY = 1_780_000_000.0  # 2026-05-28, UTC
JUNE = 1_782_000_000.0  # 2026-06-21


def test_split_is_proportional_and_exact() -> None:
    assert split(1000, {"a": 3, "b": 1}) == {"a": 750, "b": 250}
    assert split(100, {"a": 1, "b": 1, "c": 1}) == {"a": 34, "b": 33, "c": 33}  # the remainder to the largest
    assert split(0, {"a": 5}) == {"a": 0} and split(10, {"a": 0}) == {"a": 0}
    weights = {f"owner-{i}": 7 + 13 * i for i in range(11)}
    for pool in (1, 999_999, 123_456_789, 10**15 + 7):
        shares = split(pool, weights)
        assert sum(shares.values()) == pool
        for owner, share in shares.items():  # each within one micro-unit of its exact share
            assert abs(share - pool * weights[owner] / sum(weights.values())) < 1.0 + 1e-6 * pool / 10**6


def test_compute_payouts_adds_up() -> None:
    revenue = {"a": (1_000_003, to_ppm("0.7"), {"alice": 2, "bob": 1}), "b": (10, 300_000, {"carol": 5}),
               "c": (500, 500_000, {})}  # no contributing owners: all to the platform
    statement = compute_payouts("2026-05", revenue, "now")
    pools = {x.listing: x.owners_micro for x in statement.listings}
    assert pools == {"a": 700_002, "b": 3, "c": 0}
    assert [(x.owner_id, x.amount_micro) for x in statement.lines] == [("alice", 466_668), ("bob", 233_334),
                                                                       ("carol", 3)]
    assert sum(x.amount_micro for x in statement.lines) == statement.owners_micro == 700_005
    assert statement.owners_micro + statement.platform_micro == statement.revenue_micro == 1_000_513


def test_money_parsing_is_exact() -> None:
    assert to_micro("0.02") == 20_000 and to_micro("1.000001") == 1_000_001 and to_ppm("0.7") == 700_000
    for bad in ("-1", "0.0000001", "abc"):
        with pytest.raises(ValueError):
            to_micro(bad)
    with pytest.raises(ValueError):
        to_ppm("1.5")


def test_monthly_payouts_from_usage(tmp_path: Path) -> None:
    store = MarketStore(tmp_path / "state")
    for listing_id, owners in (("sentiment", {"alice": 300, "bob": 100}), ("topics", {"bob": 7, "carol": 13})):
        store.add_listing(Listing(listing_id, listing_id, listing_id, "job", "listed", True, 20_000, 700_000, "{}",
                                  ""), owners, [], "tester", [], MAY)
    key = add_buyer(store, "acme", Limits(tokens_per_day=10**9, rate_per_minute=10**6, burst=10**6), [], "tester")
    for n in range(37):
        listing = "sentiment" if n % 3 else "topics"
        usage_id, _ = admit_query(store, key, listing, "completions", 100 + n, 50, MAY + n)
        settle_query(store, usage_id, 100 + n, n, 0.1, "ok", MAY + n)
    usage_id, _ = admit_query(store, key, "sentiment", "completions", 100, 10, JUNE)  # next month's
    settle_query(store, usage_id, 100, 10, 0.1, "ok", JUNE)

    bill = buyer_statement(store, "acme", "2026-05")
    assert sum(line.requests for line in bill.lines) == 37
    with pytest.raises(MarketError, match="not over"):
        make_payouts(store, "2026-06", "tester", JUNE)
    statement, path = make_payouts(store, "2026-05", "tester", JUNE)
    assert statement.revenue_micro == bill.total_micro > 0
    for item in statement.listings:
        assert item.owners_micro == item.revenue_micro * 700_000 // 1_000_000
        lines = [x for x in statement.lines if x.listing == item.listing]
        assert sum(x.amount_micro for x in lines) == item.owners_micro
    sentiment = {x.owner_id: x.amount_micro for x in statement.lines if x.listing == "sentiment"}
    assert abs(sentiment["alice"] - 3 * sentiment["bob"]) <= 3  # 300 : 100 examples
    assert statement.owners_micro + statement.platform_micro == statement.revenue_micro

    assert json.loads(path.read_text())["owners_micro"] == statement.owners_micro
    with open(path.with_suffix(".csv"), newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert sum(int(r["amount_micro"]) for r in rows) == statement.owners_micro
    assert payout_statement(store, "2026-05") == statement
    again, _ = make_payouts(store, "2026-05", "tester", JUNE + 10)  # once a month: the recorded statement
    assert again == statement
    with store.reading() as db:
        entries = audit.entries(db)
        assert audit.verify(db) == len(entries)
    assert [e.action for e in entries].count("payouts") == 1
    assert entries[-1].details["owners_micro"] == statement.owners_micro
    store.close()
