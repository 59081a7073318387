"""``GET /v1/market/earnings?month=YYYY-MM``: a data owner's own payout lines, for a request it signed.

The request carries :mod:`protos.market_auth`'s headers. An unknown owner, a signature that does not verify, a
time outside the window or a nonce seen before gets 401 and a short message; a malformed month 400; a month with
no payouts yet 404. The answer holds only the caller's lines: other owners' amounts, and who they are, stay
private.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from coordinator.errors import CoordinatorError
from coordinator.market.payouts import payout_statement
from coordinator.market.store import MarketStore, from_micro
from coordinator.state import StateStore
from protos.market_auth import MAX_SKEW_S, MarketAuthError, check_month, parse_earnings_headers

PATH = "/v1/market/earnings"
OwnerKeys = Callable[[str], Ed25519PublicKey | None]


def use_nonce(store: MarketStore, owner_id: str, nonce: str, now: float, ttl_s: float) -> bool:
    """Record an owner's request nonce; False if it was already used within ``ttl_s`` (a replay)."""
    with store.transaction() as db:
        db.execute("DELETE FROM earnings_nonces WHERE expires_at < ?", (now,))
        try:
            db.execute("INSERT INTO earnings_nonces VALUES (?, ?, ?)", (owner_id, nonce, now + ttl_s))
        except sqlite3.IntegrityError:
            return False
    return True


def state_owner_keys(state: StateStore) -> OwnerKeys:
    """Owner keys from the coordinator's state: any registered owner (a revoked one may still be owed money)."""

    def lookup(owner_id: str) -> Ed25519PublicKey | None:
        try:
            return state.owner(owner_id).public_key
        except CoordinatorError:
            return None

    return lookup


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": code}}, status_code=status)


def owner_earnings(store: MarketStore, owner_id: str, month: str) -> dict[str, Any] | None:
    """The owner's lines of the month's payout statement, or None when the month has none yet."""
    statement = payout_statement(store, month)
    if statement is None:
        return None
    lines = statement.lines_of(owner_id)
    total = sum(line.amount_micro for line in lines)
    return {"month": month, "owner_id": owner_id, "total_micro": total, "total": from_micro(total),
            "lines": [{**line.to_json(), "amount": from_micro(line.amount_micro)} for line in lines]}


def earnings_router(store: MarketStore, owner_public_key_lookup: OwnerKeys,
                    clock: Callable[[], float] = time.time) -> APIRouter:
    router = APIRouter()

    @router.get(PATH)
    def earnings(request: Request, month: str = "") -> JSONResponse:
        try:
            check_month(month)
        except MarketAuthError as error:
            return _error(400, "bad_request", str(error))
        try:
            auth = parse_earnings_headers(dict(request.headers.items()), month)
        except MarketAuthError as error:
            return _error(401, "unauthorized", str(error))
        key = owner_public_key_lookup(auth.owner_id)
        if key is None:
            return _error(401, "unauthorized", "unknown owner")
        now = clock()
        try:
            auth.verify(key, now)
        except MarketAuthError as error:
            return _error(401, "unauthorized", str(error))
        if not use_nonce(store, auth.owner_id, auth.nonce, now, 2 * MAX_SKEW_S):
            return _error(401, "unauthorized", "replayed request (nonce already used)")
        answer = owner_earnings(store, auth.owner_id, month)
        if answer is None:
            return _error(404, "not_found", f"no payouts for {month} yet")
        return JSONResponse(answer)

    return router
