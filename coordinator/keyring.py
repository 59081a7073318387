"""The coordinator's X25519 delta-encryption keys, kept in the state directory; rotatable.

Each key is ``delta_keys/<key id>.key`` (raw, mode 0600); ``delta_keys/CURRENT`` names the one that job manifests
advertise. Older keys stay, so deltas sealed before a rotation still open.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from coordinator.errors import CoordinatorError
from protos.delta_keys import x25519_key_id, x25519_private_bytes
from protos.files import atomic_write

KEYS_DIR = "delta_keys"
CURRENT = "CURRENT"


class UnknownDeltaKeyError(CoordinatorError):
    """A sealed delta names a recipient key this coordinator does not hold."""


class DeltaKeyring:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / KEYS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / CURRENT).exists():
            self.rotate()

    def rotate(self) -> str:
        """Create a new key pair and make it current; return its key id."""
        key = X25519PrivateKey.generate()
        kid = x25519_key_id(key.public_key())
        atomic_write(self.dir / f"{kid}.key", x25519_private_bytes(key), mode=0o600)
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
        return X25519PrivateKey.from_private_bytes(path.read_bytes())
