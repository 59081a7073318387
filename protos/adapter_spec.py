"""The adapter spec: exactly which tensors a data owner trains and sends back (names, shapes, dtypes)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protos.crypto import canonical_json, sha256_hex
from protos.errors import ProtocolError

ADAPTER_SPEC_VERSION = 1


class AdapterSpecError(ProtocolError):
    """An adapter spec file is malformed."""


@dataclass(frozen=True)
class TensorSpec:
    name: str  # the full model's state-dict key (blocks keyed by full-model index)
    emulator_name: str  # the same tensor's key in the emulator
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F32, F16, BF16, ...
    role: str = "block"  # "block" (inside an adapter block) or "head" (a task head the adapter carries)


@dataclass(frozen=True)
class AdapterSpec:
    method: str
    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise AdapterSpecError("tensors: duplicate tensor names")
        if not names:
            raise AdapterSpecError("tensors: an adapter needs at least one tensor")

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}

    def num_parameters(self) -> int:
        total = 0
        for tensor in self.tensors:
            count = 1
            for dim in tensor.shape:
                count *= dim
            total += count
        return total

    def to_json(self) -> dict[str, Any]:
        return {
            "version": ADAPTER_SPEC_VERSION,
            "method": self.method,
            "tensors": [
                {"name": t.name, "emulator_name": t.emulator_name, "shape": list(t.shape), "dtype": t.dtype,
                 "role": t.role}
                for t in self.tensors
            ],
        }

    def digest(self) -> str:
        return sha256_hex(canonical_json(self.to_json()))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterSpec:
        try:
            if data["version"] != ADAPTER_SPEC_VERSION:
                raise AdapterSpecError(f"version: unsupported adapter spec version {data['version']!r}")
            tensors = tuple(
                TensorSpec(str(t["name"]), str(t["emulator_name"]), tuple(int(d) for d in t["shape"]),
                           str(t["dtype"]), str(t.get("role", "block")))
                for t in data["tensors"]
            )
            return cls(method=str(data["method"]), tensors=tensors)
        except (KeyError, TypeError) as error:
            raise AdapterSpecError(f"malformed adapter spec: missing or invalid {error}") from error

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> AdapterSpec:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as error:
            raise AdapterSpecError(f"{path}: not valid JSON: {error}") from error
