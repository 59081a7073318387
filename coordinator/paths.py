"""Where the coordinator keeps its keys and state by default: ``$OFFSITE_HOME/coordinator``."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
