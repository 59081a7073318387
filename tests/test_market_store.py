"""The marketplace's store and gate on real SQLite: keys, access, rate limits, quotas and metering."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.market import audit
from coordinator.market.buyers import Limits, add_buyer, key_hash, revoke_buyer, rotate_key
from coordinator.market.gate import MarketGate, release_pending
from coordinator.market.payouts import usage_rows
from coordinator.market.store import DB_FILE, Listing, MarketStore
from coordinator.serving.gate import Admission, GateError, QueryRequest, Settlement

T0 = 1_780_000_000.0  # a fixed clock: 2026-05-28


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def listed(store: MarketStore, listing_id: str, *, public: bool = True, allow: tuple[str, ...] = (),
           price_micro_per_1k: int = 20_000) -> Listing:
    listing = Listing(listing_id, f"adapter-{listing_id}", listing_id, "job-1", "listed", public, price_micro_per_1k,
                      700_000, "{}", "")
    return store.add_listing(listing, {"alice": 30, "bob": 10}, list(allow), "tester",
                             [("listing.add", {"listing": listing_id})], T0)


def ask(model: str, key: str | None, prompt: int = 10, max_tokens: int = 20) -> QueryRequest:
    return QueryRequest(None if key is None else f"Bearer {key}", model, "completions", prompt, max_tokens)


def counts(store: MarketStore) -> tuple[int, int, int]:
    """(usage rows, quota requests, quota tokens) over every buyer and day."""
    rows = store.query("SELECT COUNT(*) FROM usage")[0][0]
    quota = store.query("SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(tokens), 0) FROM daily_quota")[0]
    return int(rows), int(quota[0]), int(quota[1])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MarketStore]:
    opened = MarketStore(tmp_path / "state")
    yield opened
    opened.close()


def refused(gate: MarketGate, request: QueryRequest) -> GateError:
    with pytest.raises(GateError) as caught:
        gate.admit(request)
    return caught.value


def test_quota_never_negative_under_concurrent_buyers(tmp_path: Path) -> None:
    """8 threads x 50 admissions, each thread its own connection: the day's tokens never pass the quota."""
    state = tmp_path / "state"
    setup = MarketStore(state)
    listed(setup, "sentiment")
    limit = 12_000
    key = add_buyer(setup, "acme", Limits(tokens_per_day=limit, requests_per_day=10_000, rate_per_minute=10**6,
                                         burst=10**6), [], "tester")
    answered, refusals, errors, over = [], [], [], []
    lock = threading.Lock()

    def buyer(index: int) -> None:
        own = MarketStore(state)
        gate = MarketGate(own)
        try:
            for n in range(50):
                try:
                    admission = gate.admit(ask("sentiment", key, prompt=20, max_tokens=40))
                except GateError as error:
                    with lock:
                        refusals.append(error.code)
                    continue
                used = own.query("SELECT tokens FROM daily_quota")[0][0]
                if used > limit:
                    over.append(used)
                gate.settle(admission, Settlement(20, (index + n) % 41, 0.01, "ok"))
                with lock:
                    answered.append(20 + (index + n) % 41)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            own.close()

    threads = [threading.Thread(target=buyer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not over
    assert len(answered) + len(refusals) == 400 and set(refusals) <= {"quota"}
    assert len(refusals) > 0  # the quota really bit
    rows, requests, tokens = counts(setup)
    assert rows == requests == len(answered)  # one usage row per settled request, no more
    assert tokens == sum(answered) <= limit  # the reservations were all refunded down to what was used
    settled = usage_rows(setup, "acme")
    assert len(settled) == len(answered) and all(r.status == "ok" for r in settled)
    assert sum(r.tokens_in + r.tokens_out for r in settled) == tokens
    setup.close()


def test_settle_prices_and_refunds(store: MarketStore) -> None:
    listed(store, "sentiment", price_micro_per_1k=20_000)  # 0.02 a thousand tokens
    key = add_buyer(store, "acme", Limits(tokens_per_day=1000), [], "tester")
    gate = MarketGate(store, Clock())
    admission = gate.admit(ask("sentiment", key, prompt=100, max_tokens=400))
    assert admission.adapter_id == "adapter-sentiment"
    assert counts(store) == (1, 1, 500)  # reserved
    gate.settle(admission, Settlement(100, 150, 0.25, "ok"))
    assert counts(store) == (1, 1, 250)  # refunded down to the actual tokens
    (row,) = usage_rows(store, "acme")
    assert (row.tokens_in, row.tokens_out, row.latency_ms, row.price_micro) == (100, 150, 250, 5000)
    with pytest.raises(Exception, match="already settled"):
        gate.settle(admission, Settlement(100, 150, 0.25, "ok"))
    failed = gate.admit(ask("sentiment", key, prompt=100, max_tokens=100))
    gate.settle(failed, Settlement(100, 3, 0.1, "error"))  # the server's fault: not billed, nothing counted
    assert counts(store)[2] == 250 and usage_rows(store, "acme")[-1].price_micro == 0


def test_refused_requests_meter_nothing(store: MarketStore) -> None:
    listed(store, "sentiment")
    listed(store, "private", public=False)
    listed(store, "old")
    store.withdraw("old", "tester")
    key = add_buyer(store, "acme", Limits(tokens_per_day=100), [], "tester")
    gate = MarketGate(store, Clock())
    cases = [(ask("sentiment", None), 401), (ask("sentiment", "osk_not-a-key"), 401),
             (QueryRequest("Basic abc", "sentiment", "chat", 1, 1), 401), (ask("nope", key), 404),
             (ask("old", key), 410), (ask("private", key), 403), (ask("sentiment", key, 60, 50), 429),
             (ask("sentiment", key, -1, 5), 400), (ask("sentiment", key, 5, -1), 400)]
    for request, status in cases:
        assert refused(gate, request).status == status, request
    assert counts(store) == (0, 0, 0)
    assert refused(gate, ask("sentiment", key, 60, 50)).code == "quota"


def test_revoked_buyer_refused_from_next_admission_in_flight_still_metered(store: MarketStore) -> None:
    listed(store, "sentiment")
    key = add_buyer(store, "acme", Limits(), [], "tester")
    gate = MarketGate(store, Clock())
    running = gate.admit(ask("sentiment", key))
    revoke_buyer(store, "acme", "tester")
    assert refused(gate, ask("sentiment", key)).status == 401
    gate.settle(running, Settlement(10, 5, 0.1, "ok"))  # the request already running finishes and is metered
    assert [r.status for r in usage_rows(store, "acme")] == ["ok"]


def test_withdrawn_listing_refused_from_next_admission(store: MarketStore) -> None:
    listed(store, "sentiment")
    key = add_buyer(store, "acme", Limits(), [], "tester")
    gate = MarketGate(store, Clock())
    running = gate.admit(ask("sentiment", key))
    store.withdraw("sentiment", "tester")
    assert refused(gate, ask("sentiment", key)).status == 410
    gate.settle(running, Settlement(10, 5, 0.1, "ok"))
    assert len(usage_rows(store)) == 1 and gate.visible_models(f"Bearer {key}") == []


def test_rotate_key_invalidates_old_key(store: MarketStore) -> None:
    listed(store, "sentiment")
    old = add_buyer(store, "acme", Limits(), [], "tester")
    gate = MarketGate(store, Clock())
    gate.settle(gate.admit(ask("sentiment", old)), Settlement(1, 1, 0.0, "ok"))
    new = rotate_key(store, "acme", "tester")
    assert new != old
    assert refused(gate, ask("sentiment", old)).status == 401
    assert isinstance(gate.admit(ask("sentiment", new)), Admission)


def test_allow_list(store: MarketStore) -> None:
    listed(store, "public")
    key_a = add_buyer(store, "a", Limits(), [], "tester")
    key_b = add_buyer(store, "b", Limits(), [], "tester")
    listed(store, "private", public=False, allow=("a",))
    key_c = add_buyer(store, "c", Limits(), ["private"], "tester")
    gate = MarketGate(store, Clock())
    assert gate.admit(ask("private", key_a)).adapter_id == "adapter-private"
    assert gate.admit(ask("private", key_c)).adapter_id == "adapter-private"
    error = refused(gate, ask("private", key_b))
    assert (error.status, error.code) == (403, "forbidden")
    assert gate.visible_models(f"Bearer {key_a}") == ["private", "public"]
    assert gate.visible_models(f"Bearer {key_b}") == gate.visible_models(None) == ["public"]


def test_rate_limit_per_key(store: MarketStore) -> None:
    listed(store, "sentiment")
    key = add_buyer(store, "acme", Limits(rate_per_minute=60, burst=3), [], "tester")
    clock = Clock()
    gate = MarketGate(store, clock)
    for _ in range(3):
        gate.settle(gate.admit(ask("sentiment", key)), Settlement(1, 1, 0.0, "ok"))
    error = refused(gate, ask("sentiment", key))
    assert (error.status, error.code) == (429, "rate_limited")
    clock.now += 1.0  # one request a second refills
    gate.admit(ask("sentiment", key))
    assert refused(gate, ask("sentiment", key)).code == "rate_limited"
    fresh = rotate_key(store, "acme", "tester")  # the bucket is per key
    gate.admit(ask("sentiment", fresh))
    assert counts(store)[0] == 5


def test_query_budget_bounds_extraction(store: MarketStore) -> None:
    listed(store, "sentiment")
    key = add_buyer(store, "acme", Limits(query_budget=5, rate_per_minute=10**6, burst=100), [], "tester")
    gate = MarketGate(store, Clock())
    for _ in range(5):
        gate.settle(gate.admit(ask("sentiment", key)), Settlement(1, 1, 0.0, "ok"))
    error = refused(gate, ask("sentiment", key))
    assert (error.status, error.code) == (429, "query_budget")
    assert counts(store)[0] == 5


def test_keys_are_stored_hashed(store: MarketStore) -> None:
    listed(store, "sentiment")
    key = add_buyer(store, "acme", Limits(), [], "tester")
    rotated = rotate_key(store, "acme", "tester")
    store.close()
    raw = b"".join(path.read_bytes() for path in store.dir.iterdir() if path.name.startswith(DB_FILE))
    for secret in (key, rotated):
        assert secret.encode() not in raw and secret[4:20].encode() not in raw
        assert key_hash(secret).encode() in raw
    reopened = MarketStore(store.dir)
    with reopened.reading() as db:
        assert audit.verify(db) == 3  # listing.add, buyer.add, key.rotate
        assert [e.action for e in audit.entries(db)] == ["listing.add", "buyer.add", "key.rotate"]
    reopened.close()


def test_release_pending_after_a_crash(tmp_path: Path) -> None:
    """A request admitted by a server that then died: the next start closes its row and returns its reservation."""
    state = tmp_path / "state"
    crashed = MarketStore(state)
    listed(crashed, "sentiment")
    key = add_buyer(crashed, "acme", Limits(tokens_per_day=1000), [], "tester")
    MarketGate(crashed, Clock()).admit(ask("sentiment", key, 100, 400))
    crashed.close()  # never settled
    restarted = MarketStore(state)
    assert counts(restarted) == (1, 1, 500)
    assert release_pending(restarted, T0 + 60) == 1
    assert counts(restarted) == (1, 1, 0)
    (row,) = usage_rows(restarted)
    assert (row.status, row.price_micro) == ("abandoned", 0)
    assert release_pending(restarted, T0 + 60) == 0
    restarted.close()
