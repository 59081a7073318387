"""Sealed adapter delta, format v2: the contract both sides share. Each side reads the payload once. Sealing and
the format live here; opening is :mod:`protos.sealed_open`.

* Payload: the delta as safetensors bytes, at most :func:`max_plaintext_length` of the job's adapter spec.
* A fresh 32-byte data key is wrapped to the coordinator's X25519 key with HPKE (RFC 9180: X25519, HKDF-SHA256,
  ChaCha20-Poly1305); the HPKE ``info`` is a context label plus sha256 of the canonical header.
* The payload key is HKDF(data key, info = label + header digest); the payload is encrypted in chunks, STREAM
  style (as age does): nonce = 11-byte big-endian chunk counter || last-chunk flag, AAD = label + header digest.
  Each chunk's Poly1305 tag authenticates it: no digest of the plaintext or the ciphertext is taken.
* The owner signs (Ed25519) twice. The preamble signature covers sha256(header) || sha256(wrapped key): the
  coordinator checks it before it reads a chunk. The trailer signature covers sha256(header) || sha256(wrapped key)
  || sha256(tag 0 || tag 1 || ...), the tags of every chunk in order: checked after the final chunk.

Blob layout (on disk; on the wire a preamble message, chunk messages, then a trailer message)::

    MAGIC | u32 len | header JSON | u16 len | wrapped key | u16 len | preamble signature | chunks | trailer signature

A blob's address, :func:`blob_id`, is sha256(preamble bytes || tags digest || trailer signature). A changed chunk
fails its tag for anyone without the data key; unlike v1's ciphertext sha256, the tags are no commitment against
the two parties holding that key (the owner and the coordinator), who could craft other chunks with equal tags.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from safetensors.torch import save as save_safetensors

from protos.adapter_spec import AdapterSpec
from protos.crypto import SignatureError, key_id, sign, verify
from protos.delta_keys import x25519_key_id
from protos.sealed_header import (
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    MAX_CHUNK_SIZE,
    MAX_HEADER_BYTES,
    MIN_CHUNK_SIZE,
    TAG_BYTES,
    ContextMismatchError,
    DecryptionError,
    ExpectedContext,
    HeaderError,
    SealedDeltaError,
    SealedHeader,
    SealedSignatureError,
    SizeLimitError,
    TrailingDataError,
    TruncatedError,
    UnsupportedVersionError,
    check_context,
    check_header_values,
    ciphertext_length,
    is_sha256_hex,
    unsupported_version,
)
from protos.tensors import ITEM_SIZES

__all__ = [
    "CHUNK_AAD", "DEFAULT_CHUNK_SIZE", "FORMAT_VERSION", "HPKE_SUITE", "KEY_WRAP_INFO", "MAGIC", "MAX_CHUNK_SIZE",
    "MAX_HEADER_BYTES", "MIN_CHUNK_SIZE", "PAYLOAD_KEY_INFO", "PREAMBLE_CONTEXT", "SIGNATURE_BYTES", "TAG_BYTES",
    "TRAILER_BYTES", "TRAILER_CONTEXT", "WRAPPED_KEY_BYTES", "ContextMismatchError", "DecryptionError",
    "ExpectedContext", "HeaderError", "SealedDelta", "SealedDeltaError", "SealedHeader", "SealedSignatureError",
    "SizeLimitError", "Trailer", "TrailingDataError", "TruncatedError", "UnsupportedVersionError", "blob_id",
    "check_context", "check_header_values", "check_preamble_fields", "ciphertext_length", "encode_preamble",
    "is_sha256_hex", "max_plaintext_length", "preamble_message", "read_preamble", "read_sealed", "seal_delta",
    "trailer_message", "verify_preamble", "verify_trailer",
]

MAGIC = b"OFSDLT\x00" + bytes([FORMAT_VERSION])
PREAMBLE_CONTEXT = "sealed-delta/v2/preamble"
TRAILER_CONTEXT = "sealed-delta/v2/trailer"
KEY_WRAP_INFO = b"offsite/sealed-delta/v2/key-wrap\x00"
PAYLOAD_KEY_INFO = b"offsite/sealed-delta/v2/payload-key\x00"
CHUNK_AAD = b"offsite/sealed-delta/v2/chunk\x00"
SIGNATURE_BYTES = 64  # Ed25519
TRAILER_BYTES = SIGNATURE_BYTES
WRAPPED_KEY_BYTES = 32 + 32 + TAG_BYTES  # HPKE enc || sealed 32-byte key
HPKE_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


class Trailer(bytes):
    """The trailer signature as one part of a sealed delta's stream (ciphertext parts are plain ``bytes``)."""


def max_plaintext_length(spec: AdapterSpec) -> int:
    """The largest safetensors payload a delta for ``spec`` can be: the 8-byte header length, the JSON header with
    every data offset written at its widest and padded to 8 bytes (as safetensors writes it, without
    ``__metadata__``), and the tensor bytes. Pure: a function of the spec alone."""
    data = 0
    for tensor in spec.tensors:
        if tensor.dtype not in ITEM_SIZES:
            raise SizeLimitError(f"{tensor.name}: dtype {tensor.dtype!r} has no known item size")
        data += math.prod(tensor.shape) * ITEM_SIZES[tensor.dtype]
    widest = "9" * len(str(data))
    entries = [f'{json.dumps(t.name)}:{{"dtype":{json.dumps(t.dtype)},"shape":[{",".join(map(str, t.shape))}],'
               f'"data_offsets":[{widest},{widest}]}}' for t in spec.tensors]
    header = len("{" + ",".join(entries) + "}")  # ASCII escapes: never shorter than the UTF-8 safetensors writes
    return 8 + header + (-header % 8) + data


@dataclass
class SealedDelta:
    header: SealedHeader
    header_json: bytes
    wrapped_key: bytes
    signature: bytes  # the preamble signature
    ciphertext: bytes | bytearray
    trailer: bytes  # the trailer signature

    def preamble(self) -> bytes:
        return encode_preamble(self.header_json, self.wrapped_key, self.signature)

    def chunks(self) -> Iterator[memoryview]:
        """The ciphertext, one STREAM chunk (``chunk_size`` + tag bytes) at a time, without copies."""
        view, step = memoryview(self.ciphertext), self.header.chunk_size + TAG_BYTES
        for start in range(0, len(view), step):
            yield view[start:start + step]

    def tags_digest(self) -> bytes:
        tags = hashlib.sha256()
        for chunk in self.chunks():
            tags.update(chunk[-TAG_BYTES:])
        return tags.digest()

    def blob_id(self) -> str:
        return blob_id(self.preamble(), self.tags_digest(), self.trailer)

    def write(self, path: Path) -> None:
        with open(path, "wb") as out:
            out.write(self.preamble())
            out.write(self.ciphertext)
            out.write(self.trailer)


def blob_id(preamble: bytes, tags_digest: bytes, trailer: bytes) -> str:
    """A sealed blob's address: sha256 over its preamble, the digest of its chunk tags and its trailer."""
    return hashlib.sha256(preamble + tags_digest + trailer).hexdigest()


def encode_preamble(header_json: bytes, wrapped_key: bytes, signature: bytes) -> bytes:
    return b"".join([MAGIC, struct.pack(">I", len(header_json)), header_json, struct.pack(">H", len(wrapped_key)),
                     wrapped_key, struct.pack(">H", len(signature)), signature])


def check_preamble_fields(header_json: bytes, wrapped_key: bytes, signature: bytes) -> None:
    """Size limits on the preamble, before anything else reads it."""
    if len(header_json) > MAX_HEADER_BYTES:
        raise SizeLimitError(f"header of {len(header_json)} bytes exceeds {MAX_HEADER_BYTES}")
    if len(wrapped_key) != WRAPPED_KEY_BYTES:
        raise HeaderError(f"wrapped key is {len(wrapped_key)} bytes, {WRAPPED_KEY_BYTES} expected")
    if len(signature) != SIGNATURE_BYTES:
        raise HeaderError(f"preamble signature is {len(signature)} bytes, {SIGNATURE_BYTES} expected")


def _exact(stream: BinaryIO, n: int, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise TruncatedError(f"blob ends inside the {what}")
    return data


def read_preamble(stream: BinaryIO) -> tuple[bytes, bytes, bytes]:
    """Read ``(header_json, wrapped_key, signature)`` from the start of a blob, with bounded lengths."""
    magic = _exact(stream, len(MAGIC), "magic")
    if magic[:-1] == MAGIC[:-1] and magic != MAGIC:
        raise unsupported_version(magic[-1])
    if magic != MAGIC:
        raise HeaderError("not a sealed delta blob (bad magic)")
    (header_len,) = struct.unpack(">I", _exact(stream, 4, "header length"))
    if header_len > MAX_HEADER_BYTES:
        raise SizeLimitError(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    header_json = _exact(stream, header_len, "header")
    wrapped_key = _exact(stream, struct.unpack(">H", _exact(stream, 2, "wrapped key length"))[0], "wrapped key")
    signature = _exact(stream, struct.unpack(">H", _exact(stream, 2, "signature length"))[0], "signature")
    check_preamble_fields(header_json, wrapped_key, signature)
    return header_json, wrapped_key, signature


def read_sealed(path: Path) -> SealedDelta:
    """Load a sealed blob written by :meth:`SealedDelta.write` (to resend the very same bytes)."""
    with open(path, "rb") as stream:
        header_json, wrapped_key, signature = read_preamble(stream)
        header = SealedHeader.from_bytes(header_json)
        ciphertext = _exact(stream, header.ciphertext_length, "ciphertext")
        trailer = _exact(stream, TRAILER_BYTES, "trailer")
        if stream.read(1):
            raise TrailingDataError("data after the trailer")
    return SealedDelta(header, header_json, wrapped_key, signature, ciphertext, trailer)


def preamble_message(header_json: bytes, wrapped_key: bytes) -> bytes:
    return hashlib.sha256(header_json).digest() + hashlib.sha256(wrapped_key).digest()


def trailer_message(header_json: bytes, wrapped_key: bytes, tags_digest: bytes) -> bytes:
    return preamble_message(header_json, wrapped_key) + tags_digest


def verify_preamble(header_json: bytes, wrapped_key: bytes, signature: bytes,
                    sender_public: Ed25519PublicKey) -> None:
    try:
        verify(sender_public, signature, PREAMBLE_CONTEXT, preamble_message(header_json, wrapped_key))
    except SignatureError as error:
        raise SealedSignatureError("the owner's signature over the header and wrapped key does not verify") from error


def verify_trailer(header_json: bytes, wrapped_key: bytes, trailer: bytes, tags_digest: bytes,
                   sender_public: Ed25519PublicKey) -> None:
    try:
        verify(sender_public, trailer, TRAILER_CONTEXT, trailer_message(header_json, wrapped_key, tags_digest))
    except SignatureError as error:
        raise SealedSignatureError("the owner's trailer signature over the chunk tags does not verify") from error


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
    """Seal a delta (tensors, or a safetensors payload) for the coordinator in one pass: encryption only, the
    ciphertext held once; the chunk tags it produces are what the trailer signs."""
    payload = save_safetensors(delta) if isinstance(delta, dict) else delta
    view = memoryview(payload)
    header = SealedHeader(
        job_id=job_id, round=round, owner_id=owner_id, upload_id=upload_id,
        sender_key_id=key_id(owner_key.public_key()), recipient_key_id=x25519_key_id(recipient_public),
        adapter_spec_digest=adapter_spec_digest, plaintext_length=len(view), chunk_size=chunk_size,
        num_examples=num_examples,
    )
    check_header_values(asdict(header))
    header_json, header_digest = header.to_bytes(), header.digest()
    data_key = os.urandom(32)
    wrapped_key = HPKE_SUITE.encrypt(data_key, recipient_public, info=KEY_WRAP_INFO + header_digest)
    signature = sign(owner_key, PREAMBLE_CONTEXT, preamble_message(header_json, wrapped_key))
    aead, aad = _payload_aead(data_key, header_digest), CHUNK_AAD + header_digest
    ciphertext = bytearray(header.ciphertext_length)
    out, n, step = memoryview(ciphertext), header.num_chunks, chunk_size + TAG_BYTES
    tags = hashlib.sha256()
    for i in range(n):
        chunk = view[i * chunk_size:(i + 1) * chunk_size]
        end = i * step + len(chunk) + TAG_BYTES
        aead.encrypt_into(_nonce(i, i == n - 1), chunk, aad, out[i * step:end])
        tags.update(out[end - TAG_BYTES:end])
    trailer = sign(owner_key, TRAILER_CONTEXT, trailer_message(header_json, wrapped_key, tags.digest()))
    return SealedDelta(header, header_json, wrapped_key, signature, ciphertext, trailer)
