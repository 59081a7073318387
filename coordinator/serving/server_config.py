"""``STATE/serving.json``: which base model a serving state serves (recorded by the first imported run)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from coordinator.errors import InvalidSettingError
from protos.documents import Document
from protos.files import atomic_write

SERVING_FILE = "serving.json"


@dataclass(frozen=True, kw_only=True)
class ServingConfig(Document):
    base_model: Path  # the full model every served adapter plugs into

    @classmethod
    def load(cls, state_dir: Path) -> ServingConfig | None:
        path = Path(state_dir) / SERVING_FILE
        if not path.is_file():
            return None
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")), SERVING_FILE)
        except json.JSONDecodeError as error:
            raise InvalidSettingError(f"{{state}} {path}: not valid JSON") from error

    def save(self, state_dir: Path) -> None:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(state_dir) / SERVING_FILE, json.dumps(self.to_json(), indent=2) + "\n")


def base_model_dir(state_dir: Path, base: Path | None) -> Path:
    """``--base`` when given (and recorded if none is), else the recorded one."""
    recorded = ServingConfig.load(state_dir)
    if base is not None:
        record_base(state_dir, base)
        return base
    if recorded is None:
        raise InvalidSettingError(f"{{base}} {state_dir} records no base model; pass --base MODEL_DIR or import a run")
    return recorded.base_model


def record_base(state_dir: Path, base: Path) -> None:
    """Record ``base`` as the served base model unless one is recorded already."""
    if ServingConfig.load(state_dir) is None:
        ServingConfig(base_model=Path(base).resolve()).save(state_dir)
