"""``--engine torch|ort``: the torch engine, or the same engine running classification on onnxruntime."""

from __future__ import annotations

import copy
from pathlib import Path

from coordinator.errors import InvalidSettingError
from coordinator.serving.adapters import ServingState
from coordinator.serving.batching import EngineConfig
from coordinator.serving.engine import TorchEngine

ENGINES = ("torch", "ort")


def make_engine(kind: str, base_dir: Path, state: ServingState, config: EngineConfig) -> TorchEngine:
    if kind not in ENGINES:
        raise InvalidSettingError(f"{{engine}} must be torch or ort, got {kind!r}")
    engine = TorchEngine(base_dir, state, config)
    if kind == "ort":
        if engine.task != "classification":
            raise InvalidSettingError("{engine} ort serves classification adapters; this base model is a causal LM")
        from coordinator.serving.onnx_runner import OrtRunner  # onnxruntime only for --engine ort

        engine.ort = OrtRunner(copy.deepcopy(engine.inner), state.dir / "onnx", threads=config.threads)
    return engine
