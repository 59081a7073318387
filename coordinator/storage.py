"""The coordinator's state directory, opened as three parts side by side: the SQL store (owners, jobs, rounds,
uploads), the content-addressed store of sealed blobs, and the X25519 delta-key ring."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.blobs import BlobStore
from coordinator.errors import CoordinatorError
from coordinator.keyring import DeltaKeyring
from coordinator.state import StateStore

BLOBS_DIR = "blobs"
DEFAULT_MIN_FREE_BYTES = 256 << 20


class DiskFullError(CoordinatorError):
    """The state volume is too full to take an upload now."""


@dataclass
class Storage:
    dir: Path
    store: StateStore
    blobs: BlobStore
    keyring: DeltaKeyring
    recovered: list[str] = field(default_factory=list)  # what ``recover`` removed
    min_free_bytes: int = DEFAULT_MIN_FREE_BYTES  # an upload must leave at least this much disk free

    def check_free_space(self, incoming: int) -> None:
        """Refuse an upload of ``incoming`` bytes that would leave the blob volume under ``min_free_bytes``."""
        free = shutil.disk_usage(self.blobs.root).free
        if free - incoming < self.min_free_bytes:
            raise DiskFullError(f"{free} bytes free on the blob volume; an upload of {incoming} would leave less "
                                f"than the {self.min_free_bytes}-byte reserve")

    @classmethod
    def open(cls, state_dir: Path, *, recover: bool = False) -> Storage:
        """``recover=True`` (the server, at start) removes partial and unreferenced blobs; admin commands that may
        run beside a live server leave them alone."""
        state_dir = Path(state_dir)
        store = StateStore(state_dir)
        blobs = BlobStore(state_dir / BLOBS_DIR)
        storage = cls(state_dir, store, blobs, DeltaKeyring(state_dir))
        if recover:
            storage.recovered = blobs.recover(store.referenced_blobs())
        return storage

    def close(self) -> None:
        self.store.close()
