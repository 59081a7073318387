"""Where the coordinator keeps its keys and state by default: ``$OFFSITE_HOME/coordinator``."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protos import crypto
from protos.errors import OutputExistsError
from protos.files import offsite_home

SIGNING_KEY_FILE = "coordinator.key"
PUBLIC_KEY_FILE = "coordinator.pub"


def default_coordinator_dir() -> Path:
    return offsite_home() / "coordinator"


def init_keys(directory: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Create the coordinator's Ed25519 signing key pair; never overwrite one unless ``force``."""
    key_path, pub_path = directory / SIGNING_KEY_FILE, directory / PUBLIC_KEY_FILE
    if not force:
        for path in (key_path, pub_path):
            if path.exists():
                raise OutputExistsError(path)
    key = crypto.generate_signing_key()
    crypto.write_private_key(key, key_path, force=force)
    crypto.write_public_key(key.public_key(), pub_path, force=force)
    return key_path, pub_path


def load_or_create_signing_key(key_path: Path | None) -> tuple[Ed25519PrivateKey, Path]:
    """The key at ``key_path``; without one, the default key, created on first use."""
    if key_path is not None:
        return crypto.load_private_key(key_path), key_path
    default = default_coordinator_dir() / SIGNING_KEY_FILE
    if not default.exists():
        init_keys(default.parent)
    return crypto.load_private_key(default), default


ADMIN_DIR = "admin"  # in the state directory: the admin public keys the service trusts, one KEY_ID.pub each


def init_admin_key(state_dir: Path, key_path: Path, *, force: bool = False) -> str:
    """Create an Ed25519 admin key pair (``key_path``, 0600, and ``key_path`` with ``.pub``), separate from the
    coordinator's signing and delta keys, and register its public key in ``state_dir/admin/KEY_ID.pub``; returns
    the key id (the identity its admin calls carry)."""
    key_path, pub_path = Path(key_path), Path(key_path).with_suffix(".pub")
    if not force:
        for path in (key_path, pub_path):
            if path.exists():
                raise OutputExistsError(path)
    key = crypto.generate_signing_key()
    identity = crypto.key_id(key.public_key())
    crypto.write_private_key(key, key_path, force=force)
    crypto.write_public_key(key.public_key(), pub_path, force=force)
    crypto.write_public_key(key.public_key(), Path(state_dir) / ADMIN_DIR / f"{identity}.pub", force=True)
    return identity


def admin_public_key(state_dir: Path, identity: str) -> Ed25519PublicKey | None:
    """The registered admin public key with this id, or None (a file whose key has another id is ignored)."""
    if not identity.isalnum():
        return None
    path = Path(state_dir) / ADMIN_DIR / f"{identity}.pub"
    if not path.is_file():
        return None
    key = crypto.load_public_key(path)
    return key if crypto.key_id(key) == identity else None


def ensure_admin_key(state_dir: Path, key_path: Path) -> str:
    """The admin key at ``key_path`` (created when missing), registered in ``state_dir``; returns its id."""
    if not Path(key_path).exists():
        return init_admin_key(state_dir, key_path, force=True)
    key = crypto.load_private_key(Path(key_path)).public_key()
    identity = crypto.key_id(key)
    crypto.write_public_key(key, Path(state_dir) / ADMIN_DIR / f"{identity}.pub", force=True)
    return identity
