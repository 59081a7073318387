"""Per-request owner authentication for the coordinator's gRPC service, carried in gRPC metadata.

Every call carries the owner's id, a timestamp, a random nonce and the owner's Ed25519 signature over the
canonical JSON of ``(method, job, owner, time, nonce)`` under the context label ``rpc-request/v1``. The server
checks the signature with the owner's registered key, the time against a window, and that the nonce is new
(replays within the window are refused; older ones fail the time check). The coordinator's admin calls (the
ServerApp's ``OpenRound`` and ``AggregateRound``) carry the same fields under ``admin-request/v1``, with a
registered admin key's id in place of the owner id. Pure functions: no I/O.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protos.crypto import SignatureError, canonical_json, sign, verify
from protos.errors import ProtocolError
from protos.sealed_header import ID_PATTERN

CONTEXT = "rpc-request/v1"
ADMIN_CONTEXT = "admin-request/v1"  # the coordinator's admin calls: the admin key's id in place of the owner id
OWNER, JOB, TIME, NONCE = "x-offsite-owner", "x-offsite-job", "x-offsite-time", "x-offsite-nonce"
SIGNATURE = "x-offsite-signature-bin"
KEYS = (OWNER, JOB, TIME, NONCE, SIGNATURE)
MAX_SKEW_S = 300  # a request older or newer than this is refused; nonces are kept this long
NONCE_PATTERN = re.compile(r"^[0-9a-f]{32}$")


class RequestAuthError(ProtocolError):
    """A request's authentication metadata is missing, malformed, stale or does not verify."""


@dataclass(frozen=True)
class RequestAuth:
    owner_id: str
    job_id: str  # the job the call is about (a unary request's own job id must match it)
    timestamp: int  # unix seconds
    nonce: str  # 32 lowercase hex characters
    signature: bytes

    def message(self, method: str) -> bytes:
        return canonical_json({"method": method, "job_id": self.job_id, "owner_id": self.owner_id,
                               "time": self.timestamp, "nonce": self.nonce})

    def verify(self, public_key: Ed25519PublicKey, method: str, now: float, context: str = CONTEXT) -> None:
        """Raise :class:`RequestAuthError` unless the signature verifies and the time is within the window."""
        if abs(now - self.timestamp) > MAX_SKEW_S:
            raise RequestAuthError(f"request time {self.timestamp} is outside the {MAX_SKEW_S} s window")
        try:
            verify(public_key, self.signature, context, self.message(method))
        except SignatureError as error:
            raise RequestAuthError("the request signature does not verify") from error


def request_metadata(owner_key: Ed25519PrivateKey, owner_id: str, method: str, job_id: str,
                     now: float, context: str = CONTEXT) -> list[tuple[str, str | bytes]]:
    """The metadata an owner (or, with ``ADMIN_CONTEXT``, an admin key) attaches to one call of ``method`` about
    ``job_id``."""
    auth = RequestAuth(owner_id, job_id, int(now), os.urandom(16).hex(), b"")
    signature = sign(owner_key, context, auth.message(method))
    return [(OWNER, owner_id), (JOB, job_id), (TIME, str(auth.timestamp)), (NONCE, auth.nonce),
            (SIGNATURE, signature)]


def parse_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> RequestAuth:
    """Read the authentication metadata of a call; every field must be present once and well formed."""
    values: dict[str, str | bytes] = {}
    for key, value in metadata:
        if key in KEYS:
            if key in values:
                raise RequestAuthError(f"{key} appears twice")
            values[key] = value
    missing = [key for key in KEYS if key not in values]
    if missing:
        raise RequestAuthError(f"missing authentication metadata: {', '.join(missing)}")
    owner, job, stamp, nonce, signature = (values[key] for key in KEYS)
    if not isinstance(owner, str) or not ID_PATTERN.match(owner):
        raise RequestAuthError("malformed owner id")
    if not isinstance(job, str) or not ID_PATTERN.match(job):
        raise RequestAuthError("malformed job id")
    if not isinstance(stamp, str) or not stamp.isdigit() or len(stamp) > 12:
        raise RequestAuthError("malformed request time")
    if not isinstance(nonce, str) or not NONCE_PATTERN.match(nonce):
        raise RequestAuthError("malformed nonce")
    if isinstance(signature, str):  # a text value where binary was meant (-bin keys are bytes in grpc)
        try:
            signature = base64.b64decode(signature, validate=True)
        except ValueError as error:
            raise RequestAuthError("malformed signature") from error
    if len(signature) != 64:
        raise RequestAuthError("malformed signature")
    return RequestAuth(owner, job, int(stamp), nonce, bytes(signature))
