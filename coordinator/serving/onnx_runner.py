"""``--engine ort``: classification batches on onnxruntime, one graph per adapter or one LoRA base graph for many.

A ``layers`` adapter runs as its own graph: the base with the adapter's tensors plugged in. LoRA adapters that
target the same ``nn.Linear`` modules with one rank (and replace the same head tensors) share one base graph whose
LoRA factors and heads are overridable inputs (:func:`coordinator.export.onnx.export_onnx_lora`); each adapter is
an ``.onnx_adapter`` file activated for its run only. The graph is exported with scale 1 and each adapter's B
factor carries its own ``lora_alpha / r``, so adapters with different alphas share it too. Any other LoRA adapter
(a ``Conv1D`` target, ranks that differ per module) runs as its own graph with ``B @ A * scale`` merged into each
weight.

Graphs are cached under ``cache_dir`` and reused across restarts: ``<adapter_sha256>/model.onnx`` for a plugged
graph, ``lora-<digest>/base.onnx`` (digest of the base, the LoRA modules, the rank, the heads, the graph version) with
``<adapter_sha256>.onnx_adapter`` files for the shared one. Each file is written atomically; a small ``key.json``
(plugged) or ``lora_inputs.json`` (shared), written last, marks a finished build.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from coordinator.export.onnx import LORA_INPUTS_FILE, OnnxExportError, export_onnx, export_onnx_lora, write_adapter
from coordinator.export.onnx_session import ort_session, run_ort
from coordinator.serving.adapters import AdapterRecord
from coordinator.serving.batching import Job
from coordinator.serving.lora_bank import LORA_A, LORA_B, LoraFactors, read_lora
from coordinator.serving.metrics import ServingMetrics

PLUGGED_GRAPH = "model.onnx"
SHARED_GRAPH = "base.onnx"
KEY_FILE = "key.json"
GRAPH_VERSION = 2  # in every cache key: 2 = BERT traced with eager attention and fused; older graphs are rebuilt


@dataclass(frozen=True)
class _Served:
    """How one adapter runs: a session (maybe shared) and the onnxruntime adapter file to activate, if any."""

    sha256: str
    graph: Path
    session: onnxruntime.InferenceSession
    adapter: Path | None


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _write_json_atomic(path: Path, value: object) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class OrtRunner:
    """Classification on onnxruntime for the adapters the engine loads. Owns ``base`` (give it a copy)."""

    def __init__(self, base: PreTrainedModel, cache_dir: Path, *, threads: int = 2) -> None:
        if any(p.is_floating_point() and p.dtype != torch.float32 for p in base.parameters()):
            base = base.float()
        self.base = base.eval()
        self.cache_dir = Path(cache_dir)
        self.threads = threads
        self._served: dict[str, _Served] = {}
        self._sessions: dict[Path, onnxruntime.InferenceSession] = {}  # graph -> session, shared by adapters
        self._lock = threading.Lock()  # guards _served and _sessions
        self._build_lock = threading.Lock()  # one export at a time: an export hooks and swaps self.base's tensors

    # --- adapters -------------------------------------------------------------------------------------------

    def prepare(self, record: AdapterRecord, tensors: Mapping[str, torch.Tensor]) -> None:
        """Build (or reuse from disk) the graph that runs ``record`` and open its session."""
        sha256 = record.manifest.adapter_sha256
        with self._lock:
            current = self._served.get(record.adapter_id)
            if current is not None and current.sha256 == sha256:
                return
        with self._build_lock:
            if record.kind == "lora":
                lora = read_lora(record.adapter_id, record.directory, tensors)
                if self._shareable(lora):
                    graph, adapter = self._shared_graph(record, lora)
                else:
                    graph, adapter = self._plugged_graph(record, tensors, lora), None
            else:
                graph, adapter = self._plugged_graph(record, tensors, None), None
        with self._lock:
            session = self._sessions.get(graph)
        if session is None:
            session = ort_session(graph, threads=self.threads)
        run_ort(session, np.ones((1, 1), np.int64), np.ones((1, 1), np.int64), adapter)  # loads the adapter file
        with self._lock:
            session = self._sessions.setdefault(graph, session)
            self._served[record.adapter_id] = _Served(sha256, graph, session, adapter)

    def drop(self, adapter_id: str) -> None:
        """Forget an adapter; a graph no adapter uses any more closes with it."""
        with self._lock:
            served = self._served.pop(adapter_id, None)
            if served is not None and all(s.graph != served.graph for s in self._served.values()):
                self._sessions.pop(served.graph, None)

    def prepared(self) -> list[str]:
        with self._lock:
            return sorted(self._served)

    def _shareable(self, lora: LoraFactors) -> bool:
        modules = dict(self.base.named_modules())
        return (bool(lora.modules) and len(set(lora.ranks.values())) == 1
                and all(isinstance(modules.get(name), torch.nn.Linear) for name in lora.modules))

    def _scaled(self, lora: LoraFactors) -> dict[str, torch.Tensor]:
        """The adapter's tensors with each B factor times its module's scale (the shared graph's scale is 1)."""
        out = {name: t.detach().to(torch.float32) for name, t in lora.heads.items()}
        for module in lora.modules:
            out[module + LORA_A] = lora.factors[module + LORA_A].detach().to(torch.float32)
            out[module + LORA_B] = lora.factors[module + LORA_B].detach().to(torch.float32) * lora.scales[module]
        return out

    def _shared_graph(self, record: AdapterRecord, lora: LoraFactors) -> tuple[Path, Path]:
        rank = next(iter(lora.ranks.values()))
        key = {"base_model_sha256": record.manifest.base_model_sha256, "modules": lora.modules, "r": rank,
               "heads": sorted(lora.heads), "graph_version": GRAPH_VERSION}
        directory = self.cache_dir / f"lora-{_digest(key)[:32]}"
        adapter = directory / f"{record.manifest.adapter_sha256}.onnx_adapter"
        names = _read_json(directory / LORA_INPUTS_FILE)
        scaled = self._scaled(lora)
        if not isinstance(names, dict) or not (directory / SHARED_GRAPH).is_file():
            directory.mkdir(parents=True, exist_ok=True)
            # alpha = r: scale 1 in the graph, each adapter file carries its own scale
            export_onnx_lora(self.base, lora.modules, rank, rank, {adapter.stem: scaled}, directory)
            _write_json_atomic(directory / KEY_FILE, key)
        elif not adapter.is_file():
            write_adapter(scaled, names, adapter)
        return directory / SHARED_GRAPH, adapter

    def _plugged_graph(self, record: AdapterRecord, tensors: Mapping[str, torch.Tensor],
                       lora: LoraFactors | None) -> Path:
        directory = self.cache_dir / record.manifest.adapter_sha256
        graph = directory / PLUGGED_GRAPH
        key = {"base_model_sha256": record.manifest.base_model_sha256, "kind": record.kind,
               "scales": lora.scales if lora else None, "graph_version": GRAPH_VERSION}
        if graph.is_file() and _read_json(directory / KEY_FILE) == key:
            return graph
        model = copy.deepcopy(self.base)
        with torch.no_grad():
            if lora is None:
                self._plug_tensors(model, record.adapter_id, tensors)
            else:
                self._merge_lora(model, record.adapter_id, lora)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / KEY_FILE).unlink(missing_ok=True)
        export_onnx(model, graph)
        _write_json_atomic(directory / KEY_FILE, key)
        return graph

    @staticmethod
    def _plug_tensors(model: torch.nn.Module, adapter_id: str, tensors: Mapping[str, torch.Tensor]) -> None:
        targets = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
        for name, value in tensors.items():
            target = targets.get(name)
            if target is None:
                raise OnnxExportError(f"adapter {adapter_id!r}: tensor {name!r} is not in the base model")
            if tuple(target.shape) != tuple(value.shape):
                raise OnnxExportError(f"adapter {adapter_id!r}: tensor {name!r} has shape {tuple(value.shape)}, "
                                      f"the base has {tuple(target.shape)}")
            target.copy_(value.to(target.dtype).to(target.device))

    def _merge_lora(self, model: torch.nn.Module, adapter_id: str, lora: LoraFactors) -> None:
        modules = dict(model.named_modules())
        for name in lora.modules:
            module = modules.get(name)
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise OnnxExportError(f"adapter {adapter_id!r}: LoRA module {name!r} has no weight in the base")
            delta = lora.factors[name + LORA_B].float() @ lora.factors[name + LORA_A].float() * lora.scales[name]
            if tuple(delta.shape) != tuple(weight.shape):
                delta = delta.t()  # a Conv1D (fan_in_fan_out): weight is (in, out)
            if tuple(delta.shape) != tuple(weight.shape):
                raise OnnxExportError(f"adapter {adapter_id!r}: LoRA delta of {name!r} has shape "
                                      f"{tuple(delta.shape)}, the weight {tuple(weight.shape)}")
            weight.add_(delta.to(weight.dtype).to(weight.device))
        self._plug_tensors(model, adapter_id, lora.heads)

    # --- requests -------------------------------------------------------------------------------------------

    def classify(self, jobs: list[Job], tokenizer: PreTrainedTokenizerBase, metrics: ServingMetrics) -> None:
        """One run per adapter in the batch (right padding), then every job finishes: a failure finishes none."""
        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        groups: dict[str, list[int]] = {}
        for row, job in enumerate(jobs):
            groups.setdefault(job.adapter_id, []).append(row)
        with self._lock:
            missing = [adapter_id for adapter_id in groups if adapter_id not in self._served]
            served = {adapter_id: self._served[adapter_id] for adapter_id in groups if adapter_id not in missing}
        if missing:
            raise OnnxExportError(f"adapters {missing} have no ONNX session: they were never prepared")
        probabilities: list[np.ndarray | None] = [None] * len(jobs)
        for adapter_id, rows in groups.items():
            width = max(len(jobs[row].input_ids) for row in rows)
            ids = np.full((len(rows), width), pad_id, dtype=np.int64)  # right padding: (group, width)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for i, row in enumerate(rows):
                ids[i, :len(jobs[row].input_ids)] = jobs[row].input_ids
                mask[i, :len(jobs[row].input_ids)] = 1
            logits = run_ort(served[adapter_id].session, ids, mask, served[adapter_id].adapter).astype(np.float32)
            shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
            softmax = shifted / shifted.sum(axis=-1, keepdims=True)  # (group, labels)
            for i, row in enumerate(rows):
                probabilities[row] = softmax[i]
        end = time.monotonic()
        for row, job in enumerate(jobs):
            result = probabilities[row]
            assert result is not None
            metrics.prompt_tokens.inc(job.adapter_id, amount=len(job.input_ids))
            metrics.latency.observe(end - job.enqueued, job.adapter_id)
            job.done(probabilities=result.tolist(), prompt_tokens=len(job.input_ids), completion_tokens=0)
