"""Small, pure cryptographic helpers shared by both sides.

Everything that is signed is first turned into bytes by :func:`canonical_json` and prefixed with a context label,
so a signature made for one purpose never verifies for another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protos.errors import OutputExistsError, ProtocolError
from protos.files import atomic_write

HASH_CHUNK = 1 << 20


class KeyFileError(ProtocolError):
    """A key file is missing, malformed or of the wrong kind."""

    bad_input = True


class SignatureError(ProtocolError):
    """A signature does not verify."""


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8. Floats are not allowed in signed data."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_stream(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    while block := stream.read(HASH_CHUNK):
        digest.update(block)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as stream:
        return sha256_stream(stream)


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable identifier of a public key: the first 16 bytes of sha256 of its raw bytes, as hex."""
    return hashlib.sha256(public_key_bytes(key)).hexdigest()[:32]


def _labelled(context: str, message: bytes) -> bytes:
    return b"offsite/" + context.encode("ascii") + b"\x00" + message


def sign(private_key: Ed25519PrivateKey, context: str, message: bytes) -> bytes:
    return private_key.sign(_labelled(context, message))


def verify(public_key: Ed25519PublicKey, signature: bytes, context: str, message: bytes) -> None:
    """Raise :class:`SignatureError` unless ``signature`` signs ``message`` under ``context``."""
    try:
        public_key.verify(signature, _labelled(context, message))
    except InvalidSignature as error:
        raise SignatureError(f"signature does not verify for {context}") from error


def generate_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_private_key(key: Ed25519PrivateKey, path: Path, *, force: bool = False) -> None:
    """Write a PKCS#8 PEM private key with mode 0600, atomically; never overwrite unless ``force``.

    The temporary file is 0600 from its creation on, and a directory this creates for the key is 0700."""
    if path.exists() and not force:
        raise OutputExistsError(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(path, pem, mode=0o600)


def write_public_key(key: Ed25519PublicKey, path: Path, *, force: bool = False) -> None:
    if path.exists() and not force:
        raise OutputExistsError(path)
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(path, pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError as error:
        raise KeyFileError(f"private key file {path} does not exist") from error
    except ValueError as error:
        raise KeyFileError(f"{path} is not a PEM private key: {error}") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, expected an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError as error:
        raise KeyFileError(f"public key file {path} does not exist") from error
    except ValueError as error:
        raise KeyFileError(f"{path} is not a PEM public key: {error}") from error
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, expected an Ed25519 public key")
    return key


def public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as error:
        raise KeyFileError(f"not a 32-byte Ed25519 public key: {error}") from error
