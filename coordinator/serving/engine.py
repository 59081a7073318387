"""The serving engine: one base model, many adapters, requests for different adapters in one batch.

The base layers run once over the whole batch. LoRA rows get their adapter's LoRA term from the batched LoRA bank
(:mod:`coordinator.serving.lora_bank`); ``layers`` rows, and LoRA adapters' heads, go through split batching
(:mod:`coordinator.serving.split_batch`).

One engine thread runs the model. Generation is continuous (:class:`coordinator.serving.decode.RunningBatch`): new
requests join the running batch between decoding steps and finished ones leave. With nothing running, the thread
waits for a batch to form: requests of one kind, closest in length to the oldest waiting one (PetS's coordinated
batching: less padding), up to a size and a padded-token budget, after at most ``max_wait_s``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from coordinator.bundles import state_dict_digest
from coordinator.serving.adapters import AdapterRecord, AdapterRefusedError, ServingState
from coordinator.serving.batching import EngineConfig, Job, JobQueue
from coordinator.serving.cache import AdapterCache
from coordinator.serving.decode import RunningBatch, classify_rows
from coordinator.serving.lora_bank import LoraBank, read_lora
from coordinator.serving.metrics import ServingMetrics
from coordinator.serving.split_batch import RowRouter, SplitBatcher
from emulator.loading import load_model, load_tokenizer

if TYPE_CHECKING:  # onnxruntime is loaded only by --engine ort
    from coordinator.serving.onnx_runner import OrtRunner

log = logging.getLogger(__name__)
__all__ = ["AdapterRefusedError", "LoadedAdapter", "TorchEngine"]


@dataclass
class LoadedAdapter:
    record: AdapterRecord
    labels: list[str] | None = field(default=None)


class TorchEngine:
    def __init__(self, base_dir: Path, state: ServingState, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.state = state
        self.tokenizer = load_tokenizer(str(base_dir))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        arch = load_model_config_architectures(base_dir)
        self.task = "classification" if arch.endswith("ForSequenceClassification") else "causal-lm"
        self.inner: PreTrainedModel = load_model(str(base_dir), self.task).eval()
        self.base_sha256 = state_dict_digest(self.inner)
        self.base_id = str(base_dir)
        self.router = RowRouter()
        self.split = SplitBatcher(self.inner, self.router)
        self.lora = LoraBank(self.inner)
        self.adapters: dict[str, LoadedAdapter] = {}
        self.metrics = ServingMetrics()
        self.cache = AdapterCache(self.config.cache_mb << 20, self._load, self._unload,
                                  lambda event, adapter_id: self.metrics.cache.inc(adapter_id, event))
        self.model_lock = threading.Lock()  # adapters change only between batches
        self.ort: OrtRunner | None = None  # --engine ort: classification runs on onnxruntime
        self.queue = JobQueue(self.config)
        self.running = RunningBatch(self.inner, self.tokenizer, self.metrics, self._route)
        self._thread = threading.Thread(target=self._loop, name="offsite-batcher", daemon=True)
        self._stop = threading.Event()

    # --- adapters -------------------------------------------------------------------------------------------

    def _check(self, record: AdapterRecord) -> None:
        manifest = record.manifest
        if manifest.base_model_sha256 != self.base_sha256:
            raise AdapterRefusedError(f"adapter {record.adapter_id!r} was tuned on another base model")
        task = "classification" if manifest.task == "classification" else "causal-lm"
        if task != self.task:
            raise AdapterRefusedError(f"adapter {record.adapter_id!r} is a {manifest.task} adapter; this server "
                                      f"serves {self.task}")

    def _load(self, adapter_id: str) -> int:
        record = self.state.record(adapter_id)
        self._check(record)
        tensors = record.tensors()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.ort is not None:  # classification runs on onnxruntime: the torch model never sees the adapter
            self.ort.prepare(record, tensors)
            self.adapters[adapter_id] = LoadedAdapter(record, record.manifest.labels)
            return size
        lora = read_lora(adapter_id, record.directory, tensors) if record.kind == "lora" else None
        with self.model_lock:
            if lora is None:
                self.split.add(adapter_id, tensors)
                self.lora.rehook()  # a module split batching wrapped just now gets its LoRA hook on the wrapper
            else:
                self.split.add(adapter_id, lora.heads)  # a classification head: routed like a layers adapter
                try:
                    self.lora.add(adapter_id, lora)
                except BaseException:
                    self.split.remove(adapter_id)
                    raise
            self.adapters[adapter_id] = LoadedAdapter(record, record.manifest.labels)
        return size

    def _unload(self, adapter_id: str) -> None:
        with self.model_lock:
            loaded = self.adapters.pop(adapter_id, None)
            if loaded is None:
                return
            self.split.remove(adapter_id)
            self.lora.remove(adapter_id)
            if self.ort is not None:
                self.ort.drop(adapter_id)

    def adapter_labels(self, adapter_id: str) -> list[str] | None:
        return self.state.record(adapter_id).manifest.labels

    # --- requests -------------------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Load the job's adapter if needed (raises for an unservable one), then queue it."""
        record = self.state.record(job.adapter_id)
        self._check(record)
        self.cache.acquire(job.adapter_id, record.size_bytes())
        self.queue.put(job)

    def start(self) -> TorchEngine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.queue.wake()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        """Decode the running batch a step at a time; between steps, new generate requests join it and
        classification batches run. With nothing running, wait for a batch as the queue forms it."""
        torch.set_num_threads(self.config.threads)
        while not self._stop.is_set():
            if len(self.running) == 0:
                batch = self.queue.take(self._stop)
            else:
                room = self.config.max_batch_size - len(self.running) if self.running.joinable() else 0
                batch = self.queue.take_now(room)
            if batch:
                self._schedule(batch)
            if len(self.running):
                self._step()

    def _schedule(self, batch: list[Job]) -> None:
        """Fail the requests whose deadline passed while queued; run a classification batch, or prefill generate
        requests into the running batch. A batch that fails is rerun a request at a time, so only the bad one
        fails."""
        now = time.monotonic()
        live = []
        for job in batch:
            self.metrics.queue.observe(now - job.enqueued, job.adapter_id)
            if job.deadline is not None and now > job.deadline:
                self.metrics.deadline_misses.inc(job.adapter_id)
                job.fail(504, "deadline_exceeded", "the request's deadline passed before it was scheduled")
                self.cache.release(job.adapter_id)
            else:
                live.append(job)
        groups = [live] if live else []
        while groups:
            jobs = groups.pop()
            try:
                self._forward(jobs)
            except Exception:
                if len(jobs) > 1:
                    groups.extend([job] for job in jobs)
                    continue
                log.exception("request failed")
                jobs[0].fail(500, "internal_error", "the model failed on this request")
                self.cache.release(jobs[0].adapter_id)
            else:
                if jobs[0].kind == "classify":
                    for job in jobs:
                        self.cache.release(job.adapter_id)
        self._release_finished()

    def _forward(self, jobs: list[Job]) -> None:
        if jobs[0].kind != "classify":
            with self.model_lock, torch.inference_mode():
                self.running.admit(jobs)
            return
        self.metrics.batch_size.observe(len(jobs))
        if self.ort is not None:
            self.ort.classify(jobs, self.tokenizer, self.metrics)
            return
        with self.model_lock, torch.inference_mode(), self._route([job.adapter_id for job in jobs]):
            classify_rows(self.inner, self.tokenizer, jobs, {}, self.metrics)

    def _step(self) -> None:
        try:
            with self.model_lock, torch.inference_mode():
                self.running.step()
        except Exception:
            log.exception("a decoding step failed")
            self.running.fail_all(500, "internal_error", "the model failed while generating")
        self._release_finished()

    def _release_finished(self) -> None:
        """Outside the model lock: releasing may evict an adapter, and unloading takes the model lock."""
        for job in self.running.collect():
            self.cache.release(job.adapter_id)

    @contextmanager
    def _route(self, rows: list[str]) -> Iterator[None]:
        with self.router.route(rows), self.lora.route(rows):
            yield


def load_model_config_architectures(base_dir: Path) -> str:
    config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or [""]
    return str(architectures[0])
