"""onnxruntime sessions for exported graphs: a tuned CPU session, a run with an adapter file active, and the
parity check against torch that export and tests print as ``max_abs_diff``."""

from __future__ import annotations

import inspect
import threading
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from transformers import PreTrainedModel

from coordinator.export.onnx import OUTPUT, OnnxExportError


def ort_session(path: Path, *, threads: int = 2) -> onnxruntime.InferenceSession:
    """A CPU session on ``threads`` intra-op threads, sequential, every graph optimisation but SkipLayerNorm's."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # not the warning that each overridable LoRA initializer is not a constant
    # The CPU SkipLayerNormalization kernel measured ~2.5x slower than the Add + LayerNormalization it would replace.
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                        disabled_optimizers=["SkipLayerNormFusion"])


_ADAPTERS: dict[Path, tuple[int, onnxruntime.LoraAdapter]] = {}
_ADAPTERS_LOCK = threading.Lock()


def _adapter(path: Path) -> onnxruntime.LoraAdapter:
    """The loaded adapter at ``path``, cached; reloaded when the file changed."""
    key = Path(path).resolve()
    mtime = key.stat().st_mtime_ns
    with _ADAPTERS_LOCK:
        cached = _ADAPTERS.get(key)
        if cached is None or cached[0] != mtime:
            adapter = onnxruntime.LoraAdapter()
            adapter.Load(str(key))
            cached = _ADAPTERS[key] = (mtime, adapter)
        return cached[1]


def run_ort(session: onnxruntime.InferenceSession, input_ids: np.ndarray, attention_mask: np.ndarray,
            adapter: Path | None = None) -> np.ndarray:
    """Logits from ``session``; with ``adapter``, that onnxruntime adapter is active for this run only."""
    options = onnxruntime.RunOptions()
    if adapter is not None:
        options.add_active_adapter(_adapter(adapter))
    feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64),
             "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
    return np.asarray(session.run([OUTPUT], feeds, options)[0])


def torch_logits(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs).logits


def max_abs_diff(model: PreTrainedModel, session: onnxruntime.InferenceSession, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, adapter: Path | None = None) -> float:
    """Largest absolute difference between ``model``'s logits and the session's (with ``adapter`` active)."""
    expected = torch_logits(model, input_ids, attention_mask).float().cpu().numpy()
    got = run_ort(session, input_ids.cpu().numpy(), attention_mask.cpu().numpy(), adapter)
    if got.shape != expected.shape:
        raise OnnxExportError(f"ONNX logits have shape {got.shape}, torch's {expected.shape}")
    return float(np.abs(expected - got).max())
