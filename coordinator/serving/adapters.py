"""The serving state: the adapters a ``serve-models`` server may load, each a verified export in
``STATE/adapters/<id>/`` (peft for LoRA jobs, layers otherwise), pinned to the coordinator's key."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors.torch import load_file

from coordinator.errors import InvalidSettingError, NotFoundError
from coordinator.export.layers_map import ADAPTER_WEIGHTS, LAYERS_MAP, LayersMap
from coordinator.export.manifest import ExportManifest, verify_export
from protos import crypto
from protos.adapter_spec import AdapterSpec

ADAPTER_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
PEFT_WEIGHTS = "adapter_model.safetensors"
SERVABLE_FORMATS = ("peft", "layers")
Fingerprint = tuple[tuple[str, int, int, int], ...]


class AdapterRefusedError(Exception):
    """An adapter cannot be served on this base (another base model, another task, an unsupported config); the
    message says why."""


def check_adapter_id(adapter_id: str) -> str:
    if not ADAPTER_ID.match(adapter_id):
        raise InvalidSettingError(f"{{adapter_id}} must be 1-64 of a-z, 0-9, '.', '_', '-' (starting with a letter "
                                  f"or digit), got {adapter_id!r}")
    return adapter_id


@dataclass(frozen=True)
class AdapterRecord:
    adapter_id: str
    directory: Path
    manifest: ExportManifest

    @property
    def kind(self) -> str:
        return "lora" if self.manifest.format == "peft" else "layers"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors keyed by full-model names (LoRA factors and heads alike)."""
        if self.kind == "lora":
            return {name.removeprefix("base_model.model."): value
                    for name, value in load_file(str(self.directory / PEFT_WEIGHTS)).items()}
        return load_file(str(self.directory / ADAPTER_WEIGHTS))

    def layers_spec(self) -> AdapterSpec:
        text = (self.directory / LAYERS_MAP).read_text(encoding="utf-8")
        return LayersMap.from_json(json.loads(text), LAYERS_MAP).adapter_spec()

    def size_bytes(self) -> int:
        name = PEFT_WEIGHTS if self.kind == "lora" else ADAPTER_WEIGHTS
        return (self.directory / name).stat().st_size


class ServingState:
    """``STATE/coordinator.pub`` pins who signs what is served; ``STATE/adapters/<id>`` holds the exports."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.adapters_dir = self.dir / "adapters"
        self._verified: dict[str, tuple[Fingerprint, AdapterRecord]] = {}
        self._lock = threading.Lock()

    @property
    def coordinator_pub(self) -> Path:
        return self.dir / "coordinator.pub"

    def trusted_key(self) -> Ed25519PublicKey:
        if not self.coordinator_pub.is_file():
            raise NotFoundError(f"{self.coordinator_pub}: no pinned coordinator key; import an adapter first")
        return crypto.load_public_key(self.coordinator_pub)

    def pin_key(self, key: Ed25519PublicKey) -> None:
        if self.coordinator_pub.is_file():
            if crypto.key_id(crypto.load_public_key(self.coordinator_pub)) != crypto.key_id(key):
                raise InvalidSettingError(f"{{coordinator_key}} differs from the key pinned in {self.coordinator_pub}")
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        crypto.write_public_key(key, self.coordinator_pub)

    def import_export(self, export_dir: Path, adapter_id: str, coordinator_key: Ed25519PublicKey | None = None,
                      *, force: bool = False) -> AdapterRecord:
        """Verify an export (peft or layers) and copy it in; staged, then renamed, so a server never sees half."""
        check_adapter_id(adapter_id)
        key = coordinator_key or self.trusted_key()
        manifest = verify_export(export_dir, key)
        if manifest.format not in SERVABLE_FORMATS:
            raise InvalidSettingError(f"{{export}} a {manifest.format} export is not servable; export with "
                                      "--format peft (LoRA jobs) or adapter")
        self.pin_key(key)
        target = self.adapters_dir / adapter_id
        if target.exists() and not force:
            raise InvalidSettingError(f"{{adapter_id}} {adapter_id!r} is already served; pass force to replace it")
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{adapter_id}.", dir=self.adapters_dir))
        try:
            shutil.copytree(export_dir, stage, dirs_exist_ok=True)
            verify_export(stage, key)
            if target.exists():
                shutil.rmtree(target)
            stage.rename(target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return self.record(adapter_id)

    def import_run(self, run_dir: Path, adapter_id: str, key: Ed25519PrivateKey | None = None) -> AdapterRecord:
        """A finished job's adapter, exported straight into the state."""
        from coordinator.export.api import export_run  # the export stack is only needed here, not by a server

        check_adapter_id(adapter_id)
        with tempfile.TemporaryDirectory(dir=self.dir if self.dir.exists() else None) as scratch:
            out = Path(scratch) / "export"
            export_run(run_dir, "adapter", out, key)
            signer = key.public_key() if key else crypto.load_public_key(Path(run_dir) / "keys" / "coordinator.pub")
            return self.import_export(out, adapter_id, signer)

    def record(self, adapter_id: str) -> AdapterRecord:
        """A served adapter, verified against the pinned key; verified again only when a file in its directory (or
        the pinned key) changed since, so that a request does not re-hash the adapter's weights."""
        check_adapter_id(adapter_id)
        directory = self.adapters_dir / adapter_id
        if not directory.is_dir():
            raise NotFoundError(f"adapter {adapter_id!r} is not served")
        fingerprint = self._fingerprint(directory)
        with self._lock:
            cached = self._verified.get(adapter_id)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        record = AdapterRecord(adapter_id, directory, verify_export(directory, self.trusted_key()))
        with self._lock:
            self._verified[adapter_id] = (fingerprint, record)
        return record

    def _fingerprint(self, directory: Path) -> Fingerprint:
        """Every file's path, size, change time and inode, and the same of the directory and the pinned key: an
        import renames a new directory into place and an edit changes a size or a ctime, so either shows here."""
        def entry(path: Path, name: str) -> tuple[str, int, int, int]:
            stat = path.stat()
            return name, stat.st_size, stat.st_ctime_ns, stat.st_ino

        files = [entry(p, p.relative_to(directory).as_posix()) for p in sorted(directory.rglob("*"))]
        return (entry(directory, "."), entry(self.coordinator_pub, "coordinator.pub"), *files)

    def adapter_ids(self) -> list[str]:
        if not self.adapters_dir.is_dir():
            return []
        return sorted(p.name for p in self.adapters_dir.iterdir() if p.is_dir() and ADAPTER_ID.match(p.name))

    def remove(self, adapter_id: str) -> None:
        shutil.rmtree(self.adapters_dir / check_adapter_id(adapter_id))
