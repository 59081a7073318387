"""The sealed-delta v1 header (the fields bound into every chunk, the key wrapping and the signature), its strict
schema, the context a coordinator expects, and the format's typed errors."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from protos.crypto import canonical_json
from protos.errors import ProtocolError

FORMAT = "offsite-sealed-delta"
FORMAT_VERSION = 1
TAG_BYTES = 16
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 1 << 10, 1 << 24
MAX_HEADER_BYTES = 1 << 14
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")  # job, owner and upload ids
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")


class SealedDeltaError(ProtocolError):
    """A sealed delta is malformed, tampered with, or meant for another context."""


class HeaderError(SealedDeltaError):
    pass


class ContextMismatchError(SealedDeltaError):
    pass


class SealedSignatureError(SealedDeltaError):
    pass


class DecryptionError(SealedDeltaError):
    pass


class TruncatedError(SealedDeltaError):
    pass


class TrailingDataError(SealedDeltaError):
    pass


class PlaintextDigestError(SealedDeltaError):
    pass


class SizeLimitError(SealedDeltaError):
    pass


@dataclass(frozen=True)
class SealedHeader:
    job_id: str
    round: int
    owner_id: str
    upload_id: str
    sender_key_id: str
    recipient_key_id: str
    adapter_spec_digest: str
    plaintext_length: int
    plaintext_sha256: str
    chunk_size: int
    num_examples: int
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def to_bytes(self) -> bytes:
        return canonical_json(asdict(self))

    def digest(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()

    @property
    def num_chunks(self) -> int:
        return max(1, -(-self.plaintext_length // self.chunk_size))

    @property
    def ciphertext_length(self) -> int:
        return self.plaintext_length + TAG_BYTES * self.num_chunks

    @classmethod
    def from_bytes(cls, raw: bytes) -> SealedHeader:
        """Parse and check the schema strictly: exact keys, types, ranges, and the canonical encoding."""
        if len(raw) > MAX_HEADER_BYTES:
            raise HeaderError(f"header is {len(raw)} bytes, more than {MAX_HEADER_BYTES}")

        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise HeaderError(f"header is not UTF-8 JSON: {error}") from error
        if not isinstance(data, dict):
            raise HeaderError("header is not a JSON object")
        fields = set(cls.__dataclass_fields__)
        if set(data) != fields:
            raise HeaderError(f"header fields differ: missing {sorted(fields - set(data))}, "
                              f"unknown {sorted(set(data) - fields)}")
        check_header_values(data)
        header = cls(**data)
        if header.to_bytes() != raw:
            raise HeaderError("header is not canonical JSON")
        return header


def check_header_values(data: dict[str, Any]) -> None:
    if data["format"] != FORMAT or data["version"] != FORMAT_VERSION:
        raise HeaderError(f"unsupported format {data['format']!r} version {data['version']!r} (supported: 1)")
    for name in ("job_id", "owner_id", "upload_id"):
        if not isinstance(data[name], str) or not ID_PATTERN.match(data[name]):
            raise HeaderError(f"{name}: not a valid identifier")
    for name in ("sender_key_id", "recipient_key_id"):
        if not isinstance(data[name], str) or not _HEX32.match(data[name]):
            raise HeaderError(f"{name}: not a 32-hex-digit key id")
    for name in ("adapter_spec_digest", "plaintext_sha256"):
        if not isinstance(data[name], str) or not _HEX64.match(data[name]):
            raise HeaderError(f"{name}: not a sha256 hex digest")
    for name, low, high in (("round", 1, 2**31), ("plaintext_length", 0, 2**48), ("num_examples", 1, 2**48),
                            ("chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)):
        value = data[name]
        if type(value) is not int or not low <= value <= high:
            raise HeaderError(f"{name}: {value!r} is not an integer in [{low}, {high}]")


@dataclass(frozen=True)
class ExpectedContext:
    """What the coordinator expects a sealed delta to be for; any difference refuses it before decryption."""

    job_id: str
    round: int
    owner_id: str
    sender_key_id: str
    adapter_spec_digest: str
    recipient_key_id: str


def check_context(header: SealedHeader, expected: ExpectedContext) -> None:
    for name in ("job_id", "round", "owner_id", "sender_key_id", "adapter_spec_digest", "recipient_key_id"):
        got, want = getattr(header, name), getattr(expected, name)
        if got != want:
            raise ContextMismatchError(f"{name}: sealed for {got!r}, expected {want!r}")
