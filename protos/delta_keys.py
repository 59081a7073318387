"""The coordinator's X25519 delta-encryption keys: ids and raw encodings (storage lives with the coordinator)."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from protos.crypto import KeyFileError


def x25519_public_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_key_id(key: X25519PublicKey) -> str:
    """Like :func:`protos.crypto.key_id`, with its own label so an X25519 and an Ed25519 id never collide."""
    return hashlib.sha256(b"offsite/x25519-key-id\x00" + x25519_public_bytes(key)).hexdigest()[:32]


def x25519_public_from_raw(raw: bytes) -> X25519PublicKey:
    if len(raw) != 32:
        raise KeyFileError(f"an X25519 public key is 32 bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def x25519_private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
