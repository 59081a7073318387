"""The marketplace's parts of a ``serve-models --market`` server: the query gate and its HTTP routers."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter

from coordinator.market.earnings import earnings_router, state_owner_keys
from coordinator.market.gate import MarketGate, release_pending
from coordinator.market.store import MarketStore
from coordinator.state import StateStore


def market_parts(state_dir: Path, *, started: float) -> tuple[MarketGate, list[APIRouter]]:
    """Close requests a killed server left admitted and unanswered, then the gate, earnings and catalogue."""
    store = MarketStore(state_dir)
    release_pending(store, admitted_before=started)
    routers = [earnings_router(store, state_owner_keys(StateStore(state_dir)))]
    try:
        from coordinator.market.web import catalogue_router
    except ImportError:  # the catalogue is optional
        pass
    else:
        routers.append(catalogue_router(store))
    return MarketGate(store), routers
