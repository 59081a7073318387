"""The training settings of a round: what the ServerApp sends each data owner and the ClientApp reads.

``[tool.flwr.app.config]`` (``pyproject.toml``), ``FederationSettings``, ``simulate`` and the ClientApp all read and
write it through :meth:`RoundConfig.from_config` / :meth:`RoundConfig.to_config`, whose keys are Flower's
(``lora-r``, ``batch-size``; the round is ``server-round``). Its defaults are the project's one set of defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from protos.documents import Document
from protos.errors import FieldError, ProtocolError, run_config_key

ROUND_KEY = "server-round"


class RoundConfigError(ProtocolError, FieldError):
    """An invalid round setting; the message marks the field as ``{field}``."""


@dataclass(frozen=True, kw_only=True)
class RoundConfig(Document):
    method: str = "layers"  # an adapter method of emulator.methods: layers, lora, bitfit
    lora_r: int = 8
    lora_alpha: int = 16
    epochs: int = 1  # local epochs per round
    lr: float = 5e-4
    batch_size: int = 16
    max_length: int = 64  # token cap per example
    seed: int = 0
    round: int = 0  # the server round this config is for (0: not yet sent)

    def __post_init__(self) -> None:
        if not self.method or not self.method.replace("-", "").replace("_", "").isalnum():
            raise RoundConfigError(f"{{method}} must name an adapter method, got {self.method!r}")
        for name in ("lora_r", "lora_alpha", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise RoundConfigError(f"{{{name}}} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise RoundConfigError(f"{{lr}} must be > 0, got {self.lr}")
        if self.max_length < 2:
            raise RoundConfigError(f"{{max_length}} must be >= 2, got {self.max_length}")
        if self.round < 0:
            raise RoundConfigError(f"{{round}} must be >= 0, got {self.round}")

    @staticmethod
    def config_key(field: str) -> str:
        return ROUND_KEY if field == "round" else run_config_key(field)

    def to_config(self) -> dict[str, int | float | str]:
        """Flower config keys and values (a ConfigRecord / run config holds only scalars)."""
        return {self.config_key(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundConfig:
        """Read the round settings out of a Flower config (other keys are ignored); missing ones take the
        defaults; a value of the wrong type is an error naming its key."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = cls.config_key(f.name)
            if key not in config:
                continue
            value = config[key]
            kind = {"int": int, "float": float, "str": str}[str(f.type)]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not kind:
                raise RoundConfigError(f"{{{f.name}}}: expected {kind.__name__}, got {value!r}")
            values[f.name] = value
        return cls(**values)

    def for_round(self, round: int) -> RoundConfig:
        return RoundConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)}, "round": round})
