"""An owner's earnings over real HTTP: the router in a FastAPI app served by uvicorn, the real client function."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI

from client.market import EarningsError, fetch_earnings
from coordinator.market.buyers import Limits, add_buyer
from coordinator.market.earnings import earnings_router, state_owner_keys
from coordinator.market.gate import admit_query, settle_query
from coordinator.market.payouts import make_payouts
from coordinator.market.store import Listing, MarketStore
from coordinator.state import StateStore
from protos.market_auth import earnings_headers

MAY, JUNE = 1_780_000_000.0, 1_782_000_000.0
KEYS = {name: Ed25519PrivateKey.generate() for name in ("alice", "bob", "carol", "mallory")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    state = tmp_path_factory.mktemp("earnings") / "state"
    owners = StateStore(state)
    for name in ("alice", "bob", "carol"):  # mallory is not registered
        owners.add_owner(name, KEYS[name].public_key(), approved=True)
    store = MarketStore(state)
    for listing_id, contributed in (("sentiment", {"alice": 30, "bob": 10}), ("topics", {"bob": 5, "carol": 5})):
        store.add_listing(Listing(listing_id, listing_id, listing_id, "job", "listed", True, 50_000, 700_000, "{}",
                                  ""), contributed, [], "tester", [], MAY)
    key = add_buyer(store, "acme", Limits(tokens_per_day=10**9, burst=100), [], "tester")
    for n, listing in enumerate(["sentiment", "topics", "sentiment", "topics"]):
        usage_id, _ = admit_query(store, key, listing, "completions", 500, 500, MAY + n)
        settle_query(store, usage_id, 500, 400 + n, 0.2, "ok", MAY + n)
    make_payouts(store, "2026-05", "tester", JUNE)
    app = FastAPI()
    app.include_router(earnings_router(store, state_owner_keys(owners)))
    port = free_port()
    running = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not running.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    running.should_exit = True
    thread.join(timeout=10)
    store.close()
    owners.close()


def test_owner_fetches_only_its_own_lines(server: str) -> None:
    bob = fetch_earnings(server, KEYS["bob"], "bob", "2026-05")
    assert {line.listing for line in bob.lines} == {"sentiment", "topics"}
    assert all(line.owner_id == "bob" for line in bob.lines)
    assert bob.total_micro == sum(line.amount_micro for line in bob.lines) > 0
    alice = fetch_earnings(server, KEYS["alice"], "alice", "2026-05")
    assert [line.listing for line in alice.lines] == ["sentiment"]
    sentiment_bob = next(line for line in bob.lines if line.listing == "sentiment")
    assert abs(alice.total_micro - 3 * sentiment_bob.amount_micro) <= 3  # 30 : 10 examples


def test_refusals(server: str) -> None:
    for key, owner in ((KEYS["bob"], "alice"), (KEYS["mallory"], "mallory"), (KEYS["mallory"], "alice")):
        with pytest.raises(EarningsError) as caught:  # another owner's key, an unknown owner
            fetch_earnings(server, key, owner, "2026-05")
        assert caught.value.status == 401
    with pytest.raises(EarningsError, match="window") as stale:
        fetch_earnings(server, KEYS["alice"], "alice", "2026-05", now=time.time() - 3600)
    assert stale.value.status == 401
    with pytest.raises(EarningsError) as missing:
        fetch_earnings(server, KEYS["alice"], "alice", "2026-04")
    assert missing.value.status == 404
    headers = earnings_headers(KEYS["alice"], "alice", "2026-05", time.time())
    malformed = httpx.get(f"{server}/v1/market/earnings", params={"month": "26-5"}, headers=headers)
    assert malformed.status_code == 400


def test_forged_signature_and_replay(server: str) -> None:
    url = f"{server}/v1/market/earnings"
    headers = earnings_headers(KEYS["alice"], "alice", "2026-05", time.time())
    other_month = httpx.get(url, params={"month": "2026-04"}, headers=headers)  # signed for May, asked for April
    assert other_month.status_code == 401
    forged = dict(headers)
    forged["x-offsite-signature"] = earnings_headers(KEYS["bob"], "alice", "2026-05", time.time())[
        "x-offsite-signature"]
    assert httpx.get(url, params={"month": "2026-05"}, headers=forged).status_code == 401
    fresh = earnings_headers(KEYS["alice"], "alice", "2026-05", time.time())
    first = httpx.get(url, params={"month": "2026-05"}, headers=fresh)
    replay = httpx.get(url, params={"month": "2026-05"}, headers=fresh)
    assert first.status_code == 200 and first.json()["owner_id"] == "alice"
    assert replay.status_code == 401 and "replayed" in replay.json()["error"]["message"]
    unsigned = httpx.get(url, params={"month": "2026-05"})
    assert unsigned.status_code == 401 and "missing" in unsigned.json()["error"]["message"]


def test_client_cli(server: str, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from client.cli.market import market_app
    from protos.crypto import write_private_key

    app = typer.Typer()  # as client/cli/__init__.py registers it: offsite-client market earnings
    app.add_typer(market_app, name="market")
    write_private_key(KEYS["carol"], tmp_path / "owner.key")
    result = CliRunner().invoke(app, ["market", "earnings", "--server", server, "--month", "2026-05", "--key",
                                             str(tmp_path / "owner.key"), "--owner-id", "carol", "--json"])
    assert result.exit_code == 0, result.output
    assert '"owner_id": "carol"' in result.output and '"listing": "topics"' in result.output
    refused = CliRunner().invoke(app, ["market", "earnings", "--server", server, "--month", "2026-05", "--key",
                                              str(tmp_path / "owner.key"), "--owner-id", "alice"])
    assert refused.exit_code == 1 and "401" in refused.output
