"""The coordinator's X25519 delta-encryption keys, kept in the state directory; rotatable.

Each key is ``delta_keys/<key id>.key`` (mode 0600, in a directory of mode 0700); ``delta_keys/CURRENT`` names the
one that job manifests advertise. Older keys stay, so deltas sealed before a rotation still open.

A key file holds the raw 32-byte private key, or, when the environment variable ``OFFSITE_KEY_PASSPHRASE`` is set
(and not empty) as the key is created, the key as an encrypted PKCS#8 PEM under that passphrase (cryptography's
``BestAvailableEncryption``). Both forms are read, so raw keys from before a passphrase was set keep working; a PEM
key needs the same passphrase in ``OFFSITE_KEY_PASSPHRASE`` to be read, and a missing or wrong one is a
:class:`DeltaKeyFileError` naming the file. Setting a passphrase does not re-wrap existing raw keys: run
``offsite-coordinator delta-key rotate`` to make a wrapped key current.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from coordinator.errors import CoordinatorError
from protos.crypto import KeyFileError
from protos.delta_keys import x25519_key_id, x25519_private_bytes
from protos.files import atomic_write

KEYS_DIR = "delta_keys"
CURRENT = "CURRENT"
PASSPHRASE_ENV = "OFFSITE_KEY_PASSPHRASE"
RAW_KEY_BYTES = 32


class UnknownDeltaKeyError(CoordinatorError):
    """A sealed delta names a recipient key this coordinator does not hold."""


class DeltaKeyFileError(CoordinatorError, KeyFileError):
    """A delta key file cannot be read: malformed, or its passphrase (``OFFSITE_KEY_PASSPHRASE``) missing or wrong.
    The message names the file."""


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode("utf-8") if value else None


def encode_private_key(key: X25519PrivateKey) -> bytes:
    """The key file's bytes: an encrypted PKCS#8 PEM under ``$OFFSITE_KEY_PASSPHRASE`` if set, else the raw key."""
    passphrase = _passphrase()
    if passphrase is None:
        return x25519_private_bytes(key)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(passphrase))


def read_private_key(path: Path) -> X25519PrivateKey:
    """A delta key file, raw or PEM (encrypted under ``$OFFSITE_KEY_PASSPHRASE``, or not)."""
    data = Path(path).read_bytes()
    if len(data) == RAW_KEY_BYTES:
        return X25519PrivateKey.from_private_bytes(data)
    if not data.startswith(b"-----BEGIN "):
        raise DeltaKeyFileError(f"{path} is neither a raw {RAW_KEY_BYTES}-byte X25519 key nor a PEM private key")
    encrypted = data.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    passphrase = _passphrase()
    if encrypted and passphrase is None:
        raise DeltaKeyFileError(f"{path} is encrypted: set {PASSPHRASE_ENV} to its passphrase")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase if encrypted else None)
    except (ValueError, TypeError) as error:
        if encrypted:
            raise DeltaKeyFileError(f"{path} does not decrypt with the passphrase in {PASSPHRASE_ENV}: "
                                    "wrong passphrase, or a damaged file") from error
        raise DeltaKeyFileError(f"{path} is not a readable PEM private key: {error}") from error
    if not isinstance(key, X25519PrivateKey):
        raise DeltaKeyFileError(f"{path} holds a {type(key).__name__}, expected an X25519 private key")
    return key


class DeltaKeyring:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / KEYS_DIR
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if stat.S_IMODE(self.dir.stat().st_mode) != 0o700:  # mkdir's mode is less the umask; an old dir was 0755
            os.chmod(self.dir, 0o700)
        if not (self.dir / CURRENT).exists():
            self.rotate()

    def rotate(self) -> str:
        """Create a new key pair and make it current; return its key id."""
        key = X25519PrivateKey.generate()
        kid = x25519_key_id(key.public_key())
        atomic_write(self.dir / f"{kid}.key", encode_private_key(key), mode=0o600)
        atomic_write(self.dir / CURRENT, kid.encode("ascii"))
        return kid

    @property
    def current_id(self) -> str:
        return (self.dir / CURRENT).read_text().strip()

    def current(self) -> X25519PrivateKey:
        return self.get(self.current_id)

    def get(self, kid: str) -> X25519PrivateKey:
        path = self.dir / f"{kid}.key"
        if not kid.isalnum() or not path.is_file():
            raise UnknownDeltaKeyError(f"recipient key {kid!r} is not one of this coordinator's delta keys")
        return read_private_key(path)
