"""A live marketplace for tests: a tiny finished run listed in a market state, buyers with keys, and the real
serving app (``build_app`` with ``market_parts``: gate, earnings and catalogue) under uvicorn on 127.0.0.1.

``market_server(root)`` does it all and yields a :class:`LiveMarket`, which unpacks as
``(base_url, listing_id, buyer_key, state_dir, store)``; its other fields (every buyer's key, the run, the engine)
serve load and restart tests. The parts are usable alone: ``prepare_market`` builds the state (then serve it in a
subprocess with ``offsite-coordinator serve-models --market --state STATE``), ``serve`` runs a server on a state.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from coordinator.market import listings as cards
from coordinator.market.buyers import Limits, add_buyer
from coordinator.market.contributions import contributions
from coordinator.market.store import MarketStore, to_micro
from coordinator.market.wiring import market_parts
from coordinator.records import UploadRecord
from coordinator.serving.adapters import ServingState
from coordinator.serving.batching import EngineConfig
from coordinator.serving.engine import TorchEngine
from coordinator.serving.http import build_app
from coordinator.serving.ort_engine import make_engine
from coordinator.serving.server_config import base_model_dir
from coordinator.state import StateStore
from tests.runs import tiny_run

ACTOR = "market-server"
# Room for load tests: quotas and rate limits a test means to hit are set by that test.
GENEROUS = Limits(tokens_per_day=10**9, requests_per_day=10**6, rate_per_minute=10**6, burst=10**4,
                  query_budget=10**7)
NAMES = {"multiple-choice": ("definitions", "WordNet definitions",
                             "Picks the WordNet gloss that defines a word; tuned by two data owners with LoRA."),
         "classification": ("topics", "WordNet topics",
                            "Labels a WordNet gloss with its lexicographer file: plant, person, artifact ...")}


@dataclass
class Prepared:
    state_dir: Path
    run_dir: Path
    listing_id: str
    buyer_keys: dict[str, str]  # buyer id -> API key, in the order added


@dataclass
class LiveMarket:
    base_url: str
    listing_id: str
    buyer_key: str  # the first buyer's
    state_dir: Path
    store: MarketStore  # this process's own connection to the state's market.db (the server has another)
    buyer_keys: dict[str, str] = field(default_factory=dict)
    run_dir: Path | None = None
    engine: TorchEngine | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.base_url, self.listing_id, self.buyer_key, self.state_dir, self.store))


def record_contributions(run_dir: Path, examples: tuple[int, ...] = (24, 20)) -> None:
    """The run's rounds recorded as the coordinator records aggregated rounds, with each owner's accepted upload,
    so the card counts contributing owners (tiny runs skip the coordinator). Done once per run."""
    store = StateStore(run_dir / "state")
    try:
        job = store.jobs()[0]  # a tiny run has one job
        rounds = max(int(p.stem.removeprefix("round-")) for p in (run_dir / "checkpoints" / job).glob("round-*"))
        if contributions(run_dir / "state", job, rounds):
            return
        owners = sorted(o.owner_id for o in store.owners())
        for round_number in range(1, rounds + 1):
            store.open_round(job, round_number)
            store.close_round(job, round_number)
            with store.transaction() as db:
                for owner, count in zip(owners, examples, strict=False):
                    store.insert_upload(db, UploadRecord(f"u{round_number}-{owner}", job, round_number, owner,
                                                         "0" * 64, "0" * 64, count, "t", b"{}", b"", "0" * 64))
            store.mark_aggregated(job, round_number)
    finally:
        store.close()


def prepare_market(root: Path, *, method: str = "lora", task: str = "multiple-choice", buyers: int = 1,
                   limits: Limits = GENEROUS, run_dir: Path | None = None, price: str = "0.02",
                   listing_id: str | None = None, name: str | None = None, seed: int = 0) -> Prepared:
    """A tiny run (or ``run_dir``, reused), listed as ``market list --run --override-gate`` does (tiny runs fail
    the gate; ``publish`` installs the export for serving), and ``buyers`` buyers named ``buyer-1`` ... with
    ``limits``. The state is ``root/state``."""
    if run_dir is None:
        run_dir = tiny_run(root / "run", method=method, task=task, seed=seed, report=True)
    record_contributions(run_dir)
    state = root / "state"
    base_model_dir(state, run_dir / "full-model")  # records the base model (serving.json) for serve-models
    default_id, default_name, description = NAMES[task]
    store = MarketStore(state)
    try:
        terms = cards.Terms(listing_id=listing_id or default_id, name=name or default_name, description=description,
                            price_micro_per_1k=to_micro(price), owner_share_ppm=700_000, license="CC-BY-4.0")
        source = cards.source_from_run(run_dir, cards.listing_dir(store, terms.listing_id) / "export")
        cards.publish(store, source, terms, cards.run_thresholds(run_dir, None, None, None), actor=ACTOR,
                      override_reason="tiny test run: a fixture, not a useful model", now=time.time())
        keys = {f"buyer-{n}": add_buyer(store, f"buyer-{n}", limits, [], ACTOR) for n in range(1, buyers + 1)}
    finally:
        store.close()
    return Prepared(state, run_dir, terms.listing_id, keys)


@contextmanager
def serve(state_dir: Path, *, engine_config: EngineConfig | None = None, engine_kind: str = "torch",
          timeout_s: float = 60.0) -> Iterator[tuple[str, TorchEngine]]:
    """The ``serve-models --market`` server on ``state_dir`` in a background thread; yields (base URL, engine)."""
    engine = make_engine(engine_kind, base_model_dir(state_dir, None), ServingState(state_dir),
                         engine_config or EngineConfig())
    gate, routers = market_parts(state_dir, started=time.time())
    app = build_app(engine.start(), gate, routers=routers)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="market-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"the market server on {base_url} did not answer /healthz")
            time.sleep(0.05)
        yield base_url, engine
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        engine.stop()
        gate.store.close()
        sock.close()


@contextmanager
def market_server(root: Path, *, engine_config: EngineConfig | None = None, **options: Any) -> Iterator[LiveMarket]:
    """``prepare_market(root, **options)`` served live; see the module's docstring."""
    prepared = prepare_market(root, **options)
    store = MarketStore(prepared.state_dir)
    try:
        with serve(prepared.state_dir, engine_config=engine_config) as (base_url, engine):
            yield LiveMarket(base_url, prepared.listing_id, next(iter(prepared.buyer_keys.values()), ""),
                             prepared.state_dir, store, prepared.buyer_keys, prepared.run_dir, engine)
    finally:
        store.close()
