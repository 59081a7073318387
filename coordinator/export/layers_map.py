"""The layer map of a layers/bitfit export: its weights file and which full-model tensors they replace."""

from __future__ import annotations

from dataclasses import dataclass

from protos.adapter_spec import AdapterSpec
from protos.documents import Document

ADAPTER_WEIGHTS = "adapter.safetensors"
LAYERS_MAP = "layers.json"


@dataclass(frozen=True, kw_only=True)
class LayersMap(Document):
    """``layers.json`` of a layers/bitfit export: which full-model tensors ``adapter.safetensors`` replaces."""

    method: str
    blocks_prefix: str
    blocks: list[int]  # the full model's adapter blocks
    spec: dict[str, object]  # the AdapterSpec (names are the full model's state-dict keys)

    def adapter_spec(self) -> AdapterSpec:
        return AdapterSpec.from_json(dict(self.spec))
