"""A data owner's node settings: what a SuperNode's ``--node-config`` (or ``simulate``) gives the ClientApp.

Read once with :meth:`OwnerSettings.from_config`, as the ServerApp reads its own with
``FederationSettings.from_config``; keys are Flower's (``partition-id``), fields are Python's (``partition_id``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from client.errors import OwnerSettingsError
from protos.errors import run_config_key

OWNER_KEY_PATTERN = "owner-{}.key"  # in owners-dir (simulate): each simulated owner's key, by partition id
PARTITIONS = ("iid", "dirichlet")


def _default_threads() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass(frozen=True, kw_only=True)
class OwnerSettings:
    partition_id: int
    num_partitions: int
    coordinator: str  # HOST:PORT of the coordinator's gRPC service
    coordinator_key: Path  # the coordinator's public key, pinned
    job_id: str
    train_file: Path
    cache_dir: Path
    owner_key: Path | None = None  # this owner's signing key; or owners_dir + OWNER_KEY_PATTERN (simulate)
    owners_dir: Path | None = None
    root_cert: Path | None = None  # CA of the coordinator's TLS certificate
    insecure: bool = False
    partition: str = "iid"
    seed: int = 0
    val_fraction: float = 0.1
    torch_threads: int = 0  # 0: half the cores
    device: str = "auto"  # auto: CUDA when present, else CPU (emulator.device.pick_device)
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.partition_id < self.num_partitions:
            raise OwnerSettingsError(f"{{partition_id}} {self.partition_id} is outside 0..{self.num_partitions - 1}")
        if self.partition not in PARTITIONS:
            raise OwnerSettingsError(f"{{partition}} must be iid or dirichlet, got {self.partition!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise OwnerSettingsError(f"{{val_fraction}} must be in [0, 1), got {self.val_fraction}")
        if self.owner_key is None and self.owners_dir is None:
            raise OwnerSettingsError("set {owner_key} (or {owners_dir} in a simulation)")
        if not self.insecure and self.root_cert is None:
            raise OwnerSettingsError("set {root_cert} (TLS) or {insecure} (plain text, localhost only)")

    @property
    def key_path(self) -> Path:
        if self.owner_key is not None:
            return self.owner_key
        assert self.owners_dir is not None
        return self.owners_dir / OWNER_KEY_PATTERN.format(self.partition_id)

    @property
    def threads(self) -> int:
        return self.torch_threads or _default_threads()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> OwnerSettings:
        """Typed settings from Flower's run/node config; a missing required key or a bad value names the key."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = run_config_key(f.name)
            if key not in config:
                if f.default is MISSING:
                    raise OwnerSettingsError(f"missing setting {{{f.name}}} (node-config or run-config)")
                continue
            values[f.name] = _convert(f.name, str(f.type), config[key])
        return cls(**values)


NODE_CONFIG_KEYS = frozenset(run_config_key(f.name) for f in fields(OwnerSettings))


def _convert(name: str, kind: str, value: Any) -> Any:
    try:
        if kind.startswith("Path"):
            return Path(str(value)) if str(value) else None
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "false", "0", "no"):
                return str(value).lower() in ("true", "1", "yes")
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError) as error:
        raise OwnerSettingsError(f"setting {{{name}}}: cannot read {value!r} as {kind}") from error
