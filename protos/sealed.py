"""Sealed adapter delta, format v1: the contract both sides share.

* Payload: the delta as safetensors bytes.
* A fresh 32-byte data key is wrapped to the coordinator's X25519 key with HPKE (RFC 9180: X25519, HKDF-SHA256,
  ChaCha20-Poly1305); the HPKE ``info`` is a context label plus sha256 of the canonical header.
* The payload key is HKDF(data key, info = label + header digest); the payload is encrypted in chunks, STREAM
  style (as age does): nonce = 11-byte big-endian chunk counter || last-chunk flag, AAD = label + header digest.
* The owner signs (Ed25519) a fixed layout: sha256(header) || sha256(wrapped key) || sha256(ciphertext).

Blob layout (on disk and, split into a preamble and chunks, on the wire)::

    MAGIC | u32 len | header JSON | u16 len | wrapped key | u16 len | signature | ciphertext chunks
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from safetensors.torch import save as save_safetensors

from protos.crypto import SignatureError, key_id, sign, verify
from protos.delta_keys import x25519_key_id
from protos.sealed_header import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_HEADER_BYTES,
    MIN_CHUNK_SIZE,
    TAG_BYTES,
    ContextMismatchError,
    DecryptionError,
    ExpectedContext,
    HeaderError,
    PlaintextDigestError,
    SealedDeltaError,
    SealedHeader,
    SealedSignatureError,
    SizeLimitError,
    TrailingDataError,
    TruncatedError,
    check_context,
    check_header_values,
)

__all__ = [
    "CHUNK_AAD", "DEFAULT_CHUNK_SIZE", "HPKE_SUITE", "KEY_WRAP_INFO", "MAGIC", "MAX_CHUNK_SIZE", "MAX_HEADER_BYTES",
    "MIN_CHUNK_SIZE", "PAYLOAD_KEY_INFO", "SIGN_CONTEXT", "TAG_BYTES", "ContextMismatchError", "DecryptionError",
    "ExpectedContext", "HeaderError", "OpenedDelta", "PlaintextDigestError", "SealedDelta", "SealedDeltaError",
    "SealedHeader", "SealedSignatureError", "SizeLimitError", "TrailingDataError", "TruncatedError", "check_context",
    "check_header_values", "ciphertext_digest", "encode_preamble", "open_sealed", "read_preamble", "read_sealed",
    "seal_delta", "signed_message", "verify_sealed_signature",
]

MAGIC = b"OFSDLT\x00\x01"
SIGN_CONTEXT = "sealed-delta/v1"
KEY_WRAP_INFO = b"offsite/sealed-delta/v1/key-wrap\x00"
PAYLOAD_KEY_INFO = b"offsite/sealed-delta/v1/payload-key\x00"
CHUNK_AAD = b"offsite/sealed-delta/v1/chunk\x00"
WRAPPED_KEY_BYTES = 32 + 32 + TAG_BYTES  # HPKE enc || sealed 32-byte key
HPKE_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)

@dataclass
class SealedDelta:
    header: SealedHeader
    header_json: bytes
    wrapped_key: bytes
    signature: bytes
    ciphertext: bytes | bytearray

    def preamble(self) -> bytes:
        return encode_preamble(self.header_json, self.wrapped_key, self.signature)

    def chunks(self) -> Iterator[memoryview]:
        """The ciphertext, one STREAM chunk (``chunk_size`` + tag bytes) at a time, without copies."""
        view, step = memoryview(self.ciphertext), self.header.chunk_size + TAG_BYTES
        for start in range(0, len(view), step):
            yield view[start:start + step]

    def write(self, path: Path) -> None:
        with open(path, "wb") as out:
            out.write(self.preamble())
            out.write(self.ciphertext)


def encode_preamble(header_json: bytes, wrapped_key: bytes, signature: bytes) -> bytes:
    return b"".join([MAGIC, struct.pack(">I", len(header_json)), header_json, struct.pack(">H", len(wrapped_key)),
                     wrapped_key, struct.pack(">H", len(signature)), signature])


def read_preamble(stream: BinaryIO) -> tuple[bytes, bytes, bytes]:
    """Read ``(header_json, wrapped_key, signature)`` from the start of a blob, with bounded lengths."""
    def exact(n: int, what: str) -> bytes:
        data = stream.read(n)
        if len(data) != n:
            raise TruncatedError(f"blob ends inside the {what}")
        return data

    if not hmac.compare_digest(exact(len(MAGIC), "magic"), MAGIC):
        raise HeaderError("not a sealed delta v1 blob (bad magic)")
    (header_len,) = struct.unpack(">I", exact(4, "header length"))
    if header_len > MAX_HEADER_BYTES:
        raise HeaderError(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    header_json = exact(header_len, "header")
    wrapped_key = exact(struct.unpack(">H", exact(2, "wrapped key length"))[0], "wrapped key")
    signature = exact(struct.unpack(">H", exact(2, "signature length"))[0], "signature")
    return header_json, wrapped_key, signature


def read_sealed(path: Path) -> SealedDelta:
    """Load a sealed blob written by :meth:`SealedDelta.write` (to resend the very same bytes)."""
    with open(path, "rb") as stream:
        header_json, wrapped_key, signature = read_preamble(stream)
        ciphertext = stream.read()
    return SealedDelta(SealedHeader.from_bytes(header_json), header_json, wrapped_key, signature, ciphertext)


def signed_message(header_json: bytes, wrapped_key: bytes, ciphertext_sha256: bytes) -> bytes:
    return hashlib.sha256(header_json).digest() + hashlib.sha256(wrapped_key).digest() + ciphertext_sha256


def _payload_aead(data_key: bytes, header_digest: bytes) -> ChaCha20Poly1305:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PAYLOAD_KEY_INFO + header_digest)
    return ChaCha20Poly1305(hkdf.derive(data_key))


def _nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def seal_delta(
    delta: dict[str, torch.Tensor] | bytes,
    *,
    job_id: str,
    round: int,
    owner_id: str,
    upload_id: str,
    adapter_spec_digest: str,
    num_examples: int,
    owner_key: Ed25519PrivateKey,
    recipient_public: X25519PublicKey,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SealedDelta:
    """Seal a delta (tensors, or a safetensors payload) for the coordinator; the ciphertext is held once."""
    payload = save_safetensors(delta) if isinstance(delta, dict) else delta
    view = memoryview(payload)
    header = SealedHeader(
        job_id=job_id, round=round, owner_id=owner_id, upload_id=upload_id,
        sender_key_id=key_id(owner_key.public_key()), recipient_key_id=x25519_key_id(recipient_public),
        adapter_spec_digest=adapter_spec_digest, plaintext_length=len(view),
        plaintext_sha256=hashlib.sha256(view).hexdigest(), chunk_size=chunk_size, num_examples=num_examples,
    )
    check_header_values(asdict(header))
    header_json, header_digest = header.to_bytes(), header.digest()
    data_key = os.urandom(32)
    wrapped_key = HPKE_SUITE.encrypt(data_key, recipient_public, info=KEY_WRAP_INFO + header_digest)
    aead, aad = _payload_aead(data_key, header_digest), CHUNK_AAD + header_digest
    ciphertext = bytearray(header.ciphertext_length)
    out, n, step = memoryview(ciphertext), header.num_chunks, chunk_size + TAG_BYTES
    ciphertext_hash = hashlib.sha256()
    # hashlib releases the GIL, so the ciphertext is hashed on a second core while the next chunk is encrypted.
    with ThreadPoolExecutor(max_workers=1) as hasher:
        pending = None
        for i in range(n):
            chunk = view[i * chunk_size:(i + 1) * chunk_size]
            target = out[i * step:i * step + len(chunk) + TAG_BYTES]
            aead.encrypt_into(_nonce(i, i == n - 1), chunk, aad, target)
            if pending is not None:
                pending.result()
            pending = hasher.submit(ciphertext_hash.update, target)
        if pending is not None:
            pending.result()
    signature = sign(owner_key, SIGN_CONTEXT, signed_message(header_json, wrapped_key, ciphertext_hash.digest()))
    return SealedDelta(header, header_json, wrapped_key, signature, ciphertext)


def verify_sealed_signature(header_json: bytes, wrapped_key: bytes, signature: bytes, ciphertext_sha256: bytes,
                            sender_public: Ed25519PublicKey) -> None:
    try:
        verify(sender_public, signature, SIGN_CONTEXT, signed_message(header_json, wrapped_key, ciphertext_sha256))
    except SignatureError as error:
        raise SealedSignatureError("the owner's signature over the header and ciphertext does not verify") from error


@dataclass
class OpenedDelta:
    header: SealedHeader
    plaintext: bytearray  # the safetensors payload


def _read_into(stream: BinaryIO, view: memoryview) -> int:
    total = 0
    while total < len(view):
        got = stream.readinto(view[total:])  # type: ignore[attr-defined]
        if not got:
            break
        total += got
    return total


def ciphertext_digest(stream: BinaryIO, start: int) -> bytes:
    stream.seek(start)
    digest = hashlib.sha256()
    while block := stream.read(1 << 22):
        digest.update(block)
    return digest.digest()


def open_sealed(
    path: Path,
    *,
    recipient_private: X25519PrivateKey,
    sender_public: Ed25519PublicKey,
    expected: ExpectedContext,
    max_plaintext_bytes: int,
    ciphertext_sha256: bytes | None = None,
) -> OpenedDelta:
    """Open a sealed blob file: header, context, sizes, signature, then streaming decryption and the digest.

    The plaintext is the only full-size buffer: ciphertext is read chunk by chunk into a reused buffer.
    """
    with open(path, "rb") as stream:
        header_json, wrapped_key, signature = read_preamble(stream)
        header = SealedHeader.from_bytes(header_json)
        check_context(header, expected)
        if header.plaintext_length > max_plaintext_bytes:
            raise SizeLimitError(f"plaintext of {header.plaintext_length} bytes exceeds {max_plaintext_bytes}")
        start = stream.tell()
        size = os.fstat(stream.fileno()).st_size - start
        if size < header.ciphertext_length:
            raise TruncatedError(f"ciphertext is {size} bytes, {header.ciphertext_length} expected: chunks missing")
        if size > header.ciphertext_length:
            raise TrailingDataError(f"{size - header.ciphertext_length} bytes after the final chunk")
        digest = ciphertext_sha256 if ciphertext_sha256 is not None else ciphertext_digest(stream, start)
        verify_sealed_signature(header_json, wrapped_key, signature, digest, sender_public)
        stream.seek(start)
        return OpenedDelta(header, _decrypt(stream, header, wrapped_key, recipient_private))


def _decrypt(stream: BinaryIO, header: SealedHeader, wrapped_key: bytes,
             recipient_private: X25519PrivateKey) -> bytearray:
    header_digest = header.digest()
    try:
        data_key = HPKE_SUITE.decrypt(wrapped_key, recipient_private, info=KEY_WRAP_INFO + header_digest)
    except (InvalidTag, ValueError) as error:
        raise DecryptionError("the wrapped data key does not open with this coordinator key and header") from error
    aead, aad = _payload_aead(data_key, header_digest), CHUNK_AAD + header_digest
    plaintext = bytearray(header.plaintext_length)
    out, n, size = memoryview(plaintext), header.num_chunks, header.chunk_size
    buffer = memoryview(bytearray(size + TAG_BYTES))
    running = hashlib.sha256()
    # As in sealing: the plaintext is hashed on a second core while the next chunk is read and decrypted.
    with ThreadPoolExecutor(max_workers=1) as hasher:
        pending = None
        for i in range(n):
            want = min(size, header.plaintext_length - i * size) + TAG_BYTES
            if _read_into(stream, buffer[:want]) != want:
                raise TruncatedError(f"chunk {i} of {n} is incomplete")
            target = out[i * size:i * size + want - TAG_BYTES]
            try:
                aead.decrypt_into(_nonce(i, i == n - 1), buffer[:want], aad, target)
            except InvalidTag as error:
                raise DecryptionError(f"chunk {i} of {n} fails authentication (tampered, reordered or "
                                      f"misplaced)") from error
            if pending is not None:
                pending.result()
            pending = hasher.submit(running.update, target)
        if pending is not None:
            pending.result()
    if stream.read(1):
        raise TrailingDataError("data after the final chunk")
    if not hmac.compare_digest(running.hexdigest(), header.plaintext_sha256):
        raise PlaintextDigestError("plaintext sha256 differs from the header's")
    return plaintext
