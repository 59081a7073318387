"""Opening a sealed delta (format v2, see :mod:`protos.sealed`): :class:`Unsealer` decrypts chunks as they arrive,
in one pass; :func:`open_sealed` opens a stored blob after checking context, size and both signatures."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protos.sealed import (
    CHUNK_AAD,
    HPKE_SUITE,
    KEY_WRAP_INFO,
    TAG_BYTES,
    TRAILER_BYTES,
    DecryptionError,
    ExpectedContext,
    SealedHeader,
    SizeLimitError,
    TrailingDataError,
    TruncatedError,
    _exact,
    _nonce,
    _payload_aead,
    blob_id,
    check_context,
    encode_preamble,
    read_preamble,
    verify_preamble,
    verify_trailer,
)


class Unsealer:
    """Opens a sealed delta in one pass as its ciphertext arrives, in parts of any size: each STREAM chunk is
    authenticated and decrypted into :attr:`plaintext` as soon as it is complete (a part that is exactly a chunk is
    decrypted where it lies). Build it only once the preamble signature has verified; :meth:`finish` checks that
    the final chunk came and the owner's trailer signature over the tags."""

    def __init__(self, header: SealedHeader, header_json: bytes, wrapped_key: bytes,
                 recipient_private: X25519PrivateKey) -> None:
        header_digest = hashlib.sha256(header_json).digest()
        try:
            data_key = HPKE_SUITE.decrypt(wrapped_key, recipient_private, info=KEY_WRAP_INFO + header_digest)
        except (InvalidTag, ValueError) as error:
            raise DecryptionError("the wrapped data key does not open with this coordinator key and header") from error
        self.header, self._header_json, self._wrapped_key = header, header_json, wrapped_key
        self._aead, self._aad = _payload_aead(data_key, header_digest), CHUNK_AAD + header_digest
        self.plaintext = bytearray(header.plaintext_length)  # bounded by the caller's size checks
        self._out = memoryview(self.plaintext)
        self._pending = bytearray()
        self._index = 0
        self.received = 0
        self._tags = hashlib.sha256()

    @property
    def complete(self) -> bool:
        return self._index == self.header.num_chunks

    def update(self, part: bytes | bytearray | memoryview) -> None:
        view = memoryview(part)
        total = self.header.ciphertext_length
        if self.received + len(view) > total:
            raise TrailingDataError(f"data after the final chunk ({self.received + len(view)} > {total} ciphertext "
                                    f"bytes)")
        self.received += len(view)
        size = self.header.chunk_size
        while len(view):
            want = min(size, self.header.plaintext_length - self._index * size) + TAG_BYTES
            if self._pending:
                take = want - len(self._pending)
                self._pending += view[:take]
                view = view[take:]
                if len(self._pending) == want:
                    self._open(memoryview(self._pending))
                    self._pending = bytearray()
            elif len(view) >= want:
                self._open(view[:want])
                view = view[want:]
            else:
                self._pending += view
                break

    def _open(self, chunk: memoryview) -> None:
        i, n, size = self._index, self.header.num_chunks, self.header.chunk_size
        try:
            self._aead.decrypt_into(_nonce(i, i == n - 1), chunk, self._aad,
                                    self._out[i * size:i * size + len(chunk) - TAG_BYTES])
        except InvalidTag as error:
            raise DecryptionError(f"chunk {i} of {n} fails authentication (tampered, reordered or "
                                  f"misplaced)") from error
        self._tags.update(chunk[-TAG_BYTES:])
        self._index += 1

    def finish(self, trailer: bytes, sender_public: Ed25519PublicKey) -> bytes:
        """Require the final chunk, then verify the trailer signature; return the tags digest."""
        if not self.complete:
            raise TruncatedError(f"stream ended after {self.received} of {self.header.ciphertext_length} ciphertext "
                                 f"bytes: the final chunk is missing")
        tags_digest = self._tags.digest()
        verify_trailer(self._header_json, self._wrapped_key, trailer, tags_digest, sender_public)
        return tags_digest


@dataclass
class OpenedDelta:
    header: SealedHeader
    plaintext: bytearray  # the safetensors payload
    blob_id: str


def _read_into(stream: BinaryIO, view: memoryview) -> int:
    total = 0
    while total < len(view):
        got = stream.readinto(view[total:])  # type: ignore[attr-defined]
        if not got:
            break
        total += got
    return total


def open_sealed(
    path: Path,
    *,
    recipient_private: X25519PrivateKey,
    sender_public: Ed25519PublicKey,
    expected: ExpectedContext,
    max_plaintext_bytes: int,
) -> OpenedDelta:
    """Open a sealed blob file: preamble signature, context, sizes, then one pass of decryption and the trailer.

    The plaintext is the only full-size buffer: ciphertext is read chunk by chunk into a reused buffer.
    """
    with open(path, "rb") as stream:
        header_json, wrapped_key, signature = read_preamble(stream)
        header = SealedHeader.from_bytes(header_json)
        verify_preamble(header_json, wrapped_key, signature, sender_public)
        check_context(header, expected)
        if header.plaintext_length > max_plaintext_bytes:
            raise SizeLimitError(f"plaintext of {header.plaintext_length} bytes exceeds {max_plaintext_bytes}")
        rest = os.fstat(stream.fileno()).st_size - stream.tell()
        want = header.ciphertext_length + TRAILER_BYTES
        if rest < want:
            raise TruncatedError(f"{rest} bytes follow the preamble, {want} expected: chunks or trailer missing")
        if rest > want:
            raise TrailingDataError(f"{rest - want} bytes after the trailer")
        unsealer = Unsealer(header, header_json, wrapped_key, recipient_private)
        buffer = memoryview(bytearray(min(header.chunk_size, header.plaintext_length) + TAG_BYTES))
        for i in range(header.num_chunks):
            size = min(header.chunk_size, header.plaintext_length - i * header.chunk_size) + TAG_BYTES
            if _read_into(stream, buffer[:size]) != size:
                raise TruncatedError(f"chunk {i} of {header.num_chunks} is incomplete")
            unsealer.update(buffer[:size])
        trailer = _exact(stream, TRAILER_BYTES, "trailer")
        tags_digest = unsealer.finish(trailer, sender_public)
    preamble = encode_preamble(header_json, wrapped_key, signature)
    return OpenedDelta(header, unsealer.plaintext, blob_id(preamble, tags_digest, trailer))
