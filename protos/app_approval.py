"""Flower app bundles (FABs) the coordinator vouches for: what an owner's node runs, and nothing else.

Flower's own check (``flower-supernode --trusted-entities``) accepts only FABs that carry verification records from
the Flower platform; a FAB started with ``flwr run`` against a self-hosted SuperLink carries none, so that check
refuses every run. Offsite's equivalent: the coordinator signs the sha256 of each FAB it will run (context label
``app-approval/v1``, canonical JSON ``{fab_sha256, name}``), the approvals travel to each owner's node as
``trusted-apps.json`` beside the pinned ``coordinator.pub``, and the owner's ClientApp runner refuses, before the
FAB is unpacked or any of its code imported, a FAB whose digest no approval signed by that key names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protos.crypto import SignatureError, canonical_json, sha256_hex, sign, verify
from protos.documents import Document, DocumentError
from protos.errors import ProtocolError
from protos.files import atomic_write, utc_timestamp
from protos.sealed_header import is_sha256_hex

APP_APPROVAL_CONTEXT = "app-approval/v1"
TRUSTED_APPS_FILE = "trusted-apps.json"
MAX_TRUSTED_APPS_BYTES = 1 << 20


class UntrustedAppError(ProtocolError):
    """A Flower app bundle is not one the coordinator signed, or the approvals file is unreadable."""


@dataclass(frozen=True, kw_only=True)
class AppApproval(Document):
    fab_sha256: str
    name: str  # what was approved, for people reading the file: "offsite 0.1.0 (pyproject at ...)"
    approved_at: str
    signature: str  # hex Ed25519 over canonical {fab_sha256, name} under APP_APPROVAL_CONTEXT

    def __post_init__(self) -> None:
        if not is_sha256_hex(self.fab_sha256):
            raise DocumentError("fab_sha256", "expected 64 lowercase hex characters")

    def signed_bytes(self) -> bytes:
        return canonical_json({"fab_sha256": self.fab_sha256, "name": self.name})


@dataclass(frozen=True, kw_only=True)
class TrustedApps(Document):
    approvals: list[AppApproval] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> TrustedApps:
        try:
            if path.stat().st_size > MAX_TRUSTED_APPS_BYTES:
                raise UntrustedAppError(f"{path}: larger than {MAX_TRUSTED_APPS_BYTES} bytes")
            return cls.from_json(json.loads(path.read_bytes()), where=str(path))
        except (OSError, ValueError) as error:
            raise UntrustedAppError(f"cannot read the trusted apps file {path}: {error}") from error

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.to_json(), indent=2).encode() + b"\n")


def approve_app(key: Ed25519PrivateKey, fab: bytes, name: str) -> AppApproval:
    unsigned = AppApproval(fab_sha256=sha256_hex(fab), name=name, approved_at=utc_timestamp(), signature="")
    return AppApproval(fab_sha256=unsigned.fab_sha256, name=name, approved_at=unsigned.approved_at,
                       signature=sign(key, APP_APPROVAL_CONTEXT, unsigned.signed_bytes()).hex())


def check_app(fab: bytes, trusted: TrustedApps, coordinator_key: Ed25519PublicKey) -> AppApproval:
    """The approval, signed by ``coordinator_key``, that names this FAB's digest; else UntrustedAppError."""
    digest = sha256_hex(fab)
    for approval in trusted.approvals:
        if approval.fab_sha256 != digest:
            continue
        try:
            verify(coordinator_key, bytes.fromhex(approval.signature), APP_APPROVAL_CONTEXT, approval.signed_bytes())
        except (SignatureError, ValueError):
            continue  # a forged or stale entry: another may still be valid
        return approval
    raise UntrustedAppError(f"app bundle {digest[:16]} is not signed by the coordinator; refusing to run it")
