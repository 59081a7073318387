"""The sealed-delta v2 header (the fields bound into every chunk, the key wrapping and both owner signatures), its
strict schema, the context a coordinator expects, and the format's typed errors.

v2 carries no plaintext digest: every chunk's AEAD tag already authenticates it, and the owner signs the tags."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from protos.crypto import canonical_json
from protos.errors import ProtocolError

FORMAT = "offsite-sealed-delta"
FORMAT_VERSION = 2
TAG_BYTES = 16
DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 1 << 10, 1 << 24
MAX_HEADER_BYTES = 1 << 14
# \Z, not $: "$" also matches before a final newline
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")  # job, owner and upload ids
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_HEX32 = re.compile(r"^[0-9a-f]{32}\Z")


def is_sha256_hex(value: object) -> bool:
    """Exactly 64 lowercase hex characters: the only digest text that may become a file name."""
    return isinstance(value, str) and _HEX64.match(value) is not None


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


class SizeLimitError(SealedDeltaError):
    pass


class UnsupportedVersionError(HeaderError):
    """A sealed delta of another format version (v1 blobs are refused: nothing sealed with v1 was deployed)."""


def unsupported_version(version: object) -> UnsupportedVersionError:
    return UnsupportedVersionError(f"sealed delta format version {version!r} is not supported: this side reads "
                                   f"version {FORMAT_VERSION} only (seal the delta again)")


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
        return num_chunks(self.plaintext_length, self.chunk_size)

    @property
    def ciphertext_length(self) -> int:
        return ciphertext_length(self.plaintext_length, self.chunk_size)

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
        if data.get("format") == FORMAT and data.get("version") != FORMAT_VERSION:
            raise unsupported_version(data.get("version"))  # named before any other schema difference
        fields = set(cls.__dataclass_fields__)
        if set(data) != fields:
            raise HeaderError(f"header fields differ: missing {sorted(fields - set(data))}, "
                              f"unknown {sorted(set(data) - fields)}")
        check_header_values(data)
        header = cls(**data)
        if header.to_bytes() != raw:
            raise HeaderError("header is not canonical JSON")
        return header


def num_chunks(plaintext_length: int, chunk_size: int) -> int:
    return max(1, -(-plaintext_length // chunk_size))


def ciphertext_length(plaintext_length: int, chunk_size: int) -> int:
    """The sealing overhead: one AEAD tag per chunk (an empty payload is one empty chunk)."""
    return plaintext_length + TAG_BYTES * num_chunks(plaintext_length, chunk_size)


def check_header_values(data: dict[str, Any]) -> None:
    if data["format"] != FORMAT:
        raise HeaderError(f"unsupported format {data['format']!r} (expected {FORMAT!r})")
    if type(data["version"]) is not int or data["version"] != FORMAT_VERSION:
        raise unsupported_version(data["version"])
    for name in ("job_id", "owner_id", "upload_id"):
        if not isinstance(data[name], str) or not ID_PATTERN.match(data[name]):
            raise HeaderError(f"{name}: not a valid identifier")
    for name in ("sender_key_id", "recipient_key_id"):
        if not isinstance(data[name], str) or not _HEX32.match(data[name]):
            raise HeaderError(f"{name}: not a 32-hex-digit key id")
    if not isinstance(data["adapter_spec_digest"], str) or not _HEX64.match(data["adapter_spec_digest"]):
        raise HeaderError("adapter_spec_digest: not a sha256 hex digest")
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
