"""Domain types of the wire contract, independent of protobuf (``protos.serde`` converts between the two).

Signed documents (the job manifest, upload receipts) are canonical JSON plus a detached coordinator signature.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protos.adapter_spec import AdapterSpec
from protos.crypto import KeyFileError, SignatureError, canonical_json, key_id, public_key_from_raw, sign, verify
from protos.delta_keys import x25519_key_id, x25519_public_from_raw
from protos.documents import DocumentError
from protos.errors import ProtocolError
from protos.manifests import JobManifest, Limits

JOB_MANIFEST_CONTEXT = "job-manifest/v1"
RECEIPT_CONTEXT = "upload-receipt/v1"


class ManifestError(ProtocolError):
    """A signed job manifest or receipt does not verify or is malformed."""


@dataclass(frozen=True)
class SignedDocument:
    payload: bytes  # canonical JSON
    signature: bytes

    @classmethod
    def create(cls, fields: dict[str, Any], key: Ed25519PrivateKey, context: str) -> SignedDocument:
        payload = canonical_json(fields)
        return cls(payload, sign(key, context, payload))

    def open(self, key: Ed25519PublicKey, context: str) -> dict[str, Any]:
        """Verify the signature first, then parse; raise :class:`ManifestError` otherwise."""
        try:
            verify(key, self.signature, context, self.payload)
        except SignatureError as error:
            raise ManifestError(f"{context}: the coordinator's signature does not verify") from error
        data = json.loads(self.payload)
        if not isinstance(data, dict):
            raise ManifestError(f"{context}: not a JSON object")
        return data


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    round: int  # the latest round (0 before the first is opened)
    round_state: str
    bundle_digest: str
    bundle_tar_sha256: str
    bundle_size: int
    adapter_spec: AdapterSpec
    coordinator_key: Ed25519PublicKey
    delta_key_id: str
    delta_public_key: X25519PublicKey
    limits: Limits

    @classmethod
    def from_manifest(cls, data: dict[str, Any], pinned: Ed25519PublicKey) -> JobInfo:
        """Read a verified job manifest's JSON; its keys must be the pinned coordinator key and a valid delta key."""
        try:
            manifest = JobManifest.from_json(data, "job manifest")
            coordinator_key = public_key_from_raw(base64.b64decode(manifest.coordinator.public_key, validate=True))
            delta_key = x25519_public_from_raw(base64.b64decode(manifest.delta_key.public_key, validate=True))
        except (DocumentError, KeyFileError, ValueError) as error:
            raise ManifestError(f"malformed job manifest: {error}") from error
        if key_id(coordinator_key) != key_id(pinned) or manifest.coordinator.key_id != key_id(pinned):
            raise ManifestError("the manifest names another coordinator key than the pinned one")
        if x25519_key_id(delta_key) != manifest.delta_key.key_id:
            raise ManifestError("delta_key: key id does not match the key")
        return cls(
            job_id=manifest.job_id, round=manifest.round, round_state=manifest.round_state,
            bundle_digest=manifest.bundle.digest, bundle_tar_sha256=manifest.bundle.tar_sha256,
            bundle_size=manifest.bundle.size, adapter_spec=manifest.adapter_spec, coordinator_key=coordinator_key,
            delta_key_id=x25519_key_id(delta_key), delta_public_key=delta_key, limits=manifest.limits,
        )


@dataclass(frozen=True)
class Receipt:
    upload_id: str
    job_id: str
    round: int
    owner_id: str
    blob_sha256: str
    plaintext_sha256: str
    num_examples: int
    accepted_at: str
    already_accepted: bool = False

    def fields(self) -> dict[str, Any]:
        return {"kind": "offsite-upload-receipt", "upload_id": self.upload_id, "job_id": self.job_id,
                "round": self.round, "owner_id": self.owner_id, "blob_sha256": self.blob_sha256,
                "plaintext_sha256": self.plaintext_sha256, "num_examples": self.num_examples,
                "accepted_at": self.accepted_at}

    @classmethod
    def from_fields(cls, data: dict[str, Any], already_accepted: bool) -> Receipt:
        try:
            return cls(**{k: v for k, v in data.items() if k != "kind"}, already_accepted=already_accepted)
        except TypeError as error:
            raise ManifestError(f"malformed receipt: {error}") from error


@dataclass(frozen=True)
class RoundStatusInfo:
    job_id: str
    round: int
    state: str
    reason: str
    accepted_uploads: int
    total_examples: int


@dataclass(frozen=True)
class BundleChunkInfo:
    offset: int
    data: bytes
    total_size: int


@dataclass(frozen=True)
class OpenedRoundInfo:
    """``OpenRound``'s answer: the round's state and, for an OPEN round, the coordinator's signed round message
    (``protos.round_message``) and the global adapter it trains from (safetensors bytes)."""

    state: str
    done: bool
    message: bytes = b""
    signature: bytes = b""
    adapter: bytes = b""


@dataclass(frozen=True)
class AggregatedRoundInfo:
    """``AggregateRound``'s answer: the round's progress record (JSON), the new global adapter (safetensors bytes)
    and its ``adapter_sha256``."""

    record_json: bytes
    adapter: bytes
    adapter_sha256: str
