"""A data owner's signed request for its marketplace earnings, carried in HTTP headers.

The owner signs the canonical JSON of ``{method: "earnings", owner_id, month, time, nonce}`` with its Ed25519 key
under the context label ``market-earnings/v1`` (so no signature made for the gRPC service or anything else
verifies here, nor one for another month). The coordinator checks the signature with the owner's registered key,
the time against a window, and that the nonce is new within it. Pure functions: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protos.crypto import SignatureError, canonical_json, sign, verify
from protos.errors import ProtocolError
from protos.sealed_header import ID_PATTERN

CONTEXT = "market-earnings/v1"
METHOD = "earnings"
OWNER, TIME, NONCE, SIGNATURE = "x-offsite-owner", "x-offsite-time", "x-offsite-nonce", "x-offsite-signature"
KEYS = (OWNER, TIME, NONCE, SIGNATURE)
MAX_SKEW_S = 300  # a request older or newer than this is refused; nonces are kept this long
NONCE_PATTERN = re.compile(r"^[0-9a-f]{32}\Z")
MONTH_PATTERN = re.compile(r"^\d{4}-(0[1-9]|1[0-2])\Z")


class MarketAuthError(ProtocolError):
    """An earnings request's authentication headers are missing, malformed, stale or do not verify."""


@dataclass(frozen=True)
class EarningsAuth:
    owner_id: str
    month: str  # YYYY-MM, from the query string: signed, so a signature for one month is useless for another
    timestamp: int  # unix seconds
    nonce: str  # 32 lowercase hex characters
    signature: bytes

    def message(self) -> bytes:
        return canonical_json({"method": METHOD, "owner_id": self.owner_id, "month": self.month,
                               "time": self.timestamp, "nonce": self.nonce})

    def verify(self, public_key: Ed25519PublicKey, now: float) -> None:
        """Raise :class:`MarketAuthError` unless the time is within the window and the signature verifies."""
        if abs(now - self.timestamp) > MAX_SKEW_S:
            raise MarketAuthError(f"request time {self.timestamp} is outside the {MAX_SKEW_S} s window")
        try:
            verify(public_key, self.signature, CONTEXT, self.message())
        except SignatureError as error:
            raise MarketAuthError("the request signature does not verify") from error


def check_month(month: str) -> str:
    if not MONTH_PATTERN.match(month):
        raise MarketAuthError(f"month must be YYYY-MM, got {month!r}")
    return month


def earnings_headers(owner_key: Ed25519PrivateKey, owner_id: str, month: str, now: float) -> dict[str, str]:
    """The headers an owner sends with ``GET /v1/market/earnings?month=MONTH``."""
    auth = EarningsAuth(owner_id, check_month(month), int(now), os.urandom(16).hex(), b"")
    signature = sign(owner_key, CONTEXT, auth.message())
    return {OWNER: owner_id, TIME: str(auth.timestamp), NONCE: auth.nonce,
            SIGNATURE: base64.b64encode(signature).decode("ascii")}


def parse_earnings_headers(headers: Mapping[str, str], month: str) -> EarningsAuth:
    """Read the authentication headers of an earnings request for ``month``; every one must be well formed."""
    lowered = {key.lower(): value for key, value in headers.items()}
    missing = [key for key in KEYS if key not in lowered]
    if missing:
        raise MarketAuthError(f"missing authentication headers: {', '.join(missing)}")
    owner, stamp, nonce, signature = (lowered[key] for key in KEYS)
    if not ID_PATTERN.match(owner):
        raise MarketAuthError("malformed owner id")
    if not stamp.isdigit() or len(stamp) > 12:
        raise MarketAuthError("malformed request time")
    if not NONCE_PATTERN.match(nonce):
        raise MarketAuthError("malformed nonce")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as error:
        raise MarketAuthError("malformed signature") from error
    if len(raw) != 64:
        raise MarketAuthError("malformed signature")
    return EarningsAuth(owner, check_month(month), int(stamp), nonce, raw)
