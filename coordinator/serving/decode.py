"""A model's forward passes for the engine: continuous greedy decoding with a KV cache and per-row streaming, and
classification.

:class:`RunningBatch` holds the generate requests being decoded. New requests join it between decoding steps
(iteration-level scheduling, as in Orca): they are prefilled on their own, and their KV cache, attention mask and
positions are left-padded to the running batch's width and stacked under it. Finished rows leave after the step
that finished them, and the columns no remaining row needs are cut off. Every row attends only to its own tokens
(the mask) at its own positions, so a row's tokens equal those of running it alone.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from coordinator.serving.batching import Job
from coordinator.serving.metrics import ServingMetrics
from coordinator.serving.tensors import zero_pad

log = logging.getLogger(__name__)
Route = Callable[[list[str]], AbstractContextManager[Any]]  # rows' adapter ids -> the context a forward runs in


def _left_padded(jobs: list[Job], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(j.input_ids) for j in jobs)
    ids = torch.full((len(jobs), width), pad_id, dtype=torch.long)  # (batch, width)
    mask = torch.zeros((len(jobs), width), dtype=torch.long)
    for row, job in enumerate(jobs):
        ids[row, width - len(job.input_ids):] = torch.tensor(job.input_ids)
        mask[row, width - len(job.input_ids):] = 1
    return ids, mask


class _Detokenizer:
    """Text deltas from a growing list of token ids (holds back an incomplete multi-byte character)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, list[int](), ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = str(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def text(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))


class RunningBatch:
    """The generate requests being decoded together, and their KV cache."""

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, metrics: ServingMetrics,
                 route: Route) -> None:
        self.model, self.tokenizer, self.metrics, self.route = model, tokenizer, metrics, route
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.keep_last = _keep_last(model)
        self.finished: list[Job] = []  # since the engine last collected them
        self._reset()

    def _reset(self) -> None:
        self.jobs: list[Job] = []
        self.detok: list[_Detokenizer] = []
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)  # (batch, width): 1 where a row has a token
        self.positions = torch.zeros((0, 1), dtype=torch.long)  # (batch, 1): each row's next position
        self.next_ids = torch.zeros((0,), dtype=torch.long)  # (batch,): each row's last chosen token

    def __len__(self) -> int:
        return len(self.jobs)

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def joinable(self) -> bool:
        """New rows can join only a cache of plain layers (a sliding-window cache keeps its own length)."""
        return self.cache is None or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def admit(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` and add them to the batch. If the forward pass raises, nothing has changed."""
        ids, mask = _left_padded(jobs, self.pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
        with self.route([job.adapter_id for job in jobs]):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **self.keep_last)
        self.metrics.batch_size.observe(len(jobs))
        first = len(self.jobs)
        self._join(jobs, out.cache, mask, positions[:, -1:] + 1, out.logits[:, -1, :].argmax(-1))
        self._take(range(first, len(self.jobs)))

    def step(self) -> None:
        """One token for every row. If the forward pass raises, every row fails (the caller reports it)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.jobs), 1))], dim=1)
        with self.route([job.adapter_id for job in self.jobs]):
            out = self.model(input_ids=self.next_ids[:, None], attention_mask=self.mask, position_ids=self.positions,
                             cache=self.cache, use_cache=True)
        self.metrics.batch_size.observe(len(self.jobs))
        self.cache, self.positions = out.cache, self.positions + 1
        self.next_ids = out.logits[:, -1, :].argmax(-1)  # (batch,)
        self._take(range(len(self.jobs)))

    def fail_all(self, status: int, code: str, message: str) -> None:
        for job in self.jobs:
            job.fail(status, code, message)
        self.finished.extend(self.jobs)
        self._keep([])

    def collect(self) -> list[Job]:
        finished, self.finished = self.finished, []
        return finished

    def _join(self, jobs: list[Job], cache: Any, mask: torch.Tensor, positions: torch.Tensor,
              next_ids: torch.Tensor) -> None:
        if self.jobs:  # keys and values: (batch, heads, width, head_dim)
            width = max(self.width, int(mask.shape[1]))

            def stacked(top: torch.Tensor, bottom: torch.Tensor, dim: int) -> torch.Tensor:
                return torch.cat([zero_pad(top, width, dim, left=True), zero_pad(bottom, width, dim, left=True)])

            for old, new in zip(self.cache.layers, cache.layers, strict=True):
                old.keys, old.values = stacked(old.keys, new.keys, 2), stacked(old.values, new.values, 2)
            mask = stacked(self.mask, mask, 1)
            positions = torch.cat([self.positions, positions])
            next_ids = torch.cat([self.next_ids, next_ids])
            cache = self.cache
        self.jobs, self.cache, self.mask = self.jobs + jobs, cache, mask
        self.positions, self.next_ids = positions, next_ids
        self.detok += [_Detokenizer(self.tokenizer) for _ in jobs]

    def _take(self, rows: range) -> None:
        """Stream each row's new token; finish the rows that are done and drop them from the batch. A row whose
        consumer raises (a callback, say, settling its usage) fails alone; the batch goes on."""
        done = set()
        for row in rows:
            try:
                finished = self._advance(row)
            except Exception:
                log.exception("a request's callback failed")
                job, finished = self.jobs[row], True
                if not any(job is f for f in self.finished):
                    self.finished.append(job)
                with contextlib.suppress(Exception):
                    job.fail(500, "internal_error", "the server failed while answering this request")
            if finished:
                done.add(row)
        if done:
            self._keep([row for row in range(len(self.jobs)) if row not in done])

    def _advance(self, row: int) -> bool:
        """Stream row ``row``'s new token; True when the row finished."""
        job, token, eos = self.jobs[row], int(self.next_ids[row]), self.tokenizer.eos_token_id
        reason: str | None = None
        if job.max_new_tokens < 1:
            reason = "length"
        elif eos is not None and token == eos:
            reason = "stop"
        else:
            job.token(self.detok[row].push(token))
            if len(self.detok[row].ids) >= job.max_new_tokens:
                reason = "length"
            elif job.deadline is not None and time.monotonic() > job.deadline:
                reason = "deadline"
        if reason is not None:
            self._finish(row, reason)
        return reason is not None

    def _finish(self, row: int, reason: str) -> None:
        job, detok, end = self.jobs[row], self.detok[row], time.monotonic()
        generated = len(detok.ids)
        self.metrics.tokens.inc(job.adapter_id, amount=generated)
        self.metrics.prompt_tokens.inc(job.adapter_id, amount=len(job.input_ids))
        if job.first_token_at is not None:
            self.metrics.ttft.observe(job.first_token_at - job.enqueued, job.adapter_id)
        self.finished.append(job)
        if reason == "deadline":
            self.metrics.deadline_misses.inc(job.adapter_id)
            job.fail(504, "deadline_exceeded", f"the request's deadline passed after {generated} tokens")
            return
        self.metrics.latency.observe(end - job.enqueued, job.adapter_id)
        job.done(text=detok.text(), finish_reason=reason, completion_tokens=generated,
                 prompt_tokens=len(job.input_ids), token_ids=list(detok.ids))

    def _keep(self, rows: list[int]) -> None:
        """Keep only ``rows``; cut the leading columns that every remaining row has masked out."""
        if not rows:
            self._reset()
            return
        index = torch.tensor(rows, dtype=torch.long)
        self.jobs = [self.jobs[row] for row in rows]
        self.detok = [self.detok[row] for row in rows]
        self.mask, self.positions, self.next_ids = self.mask[index], self.positions[index], self.next_ids[index]
        for layer in self.cache.layers:
            layer.batch_select_indices(index)
        start = int(self.mask.any(0).nonzero()[0])
        if start > 0 and self.joinable():
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def _keep_last(model: torch.nn.Module) -> dict[str, int]:
    """``logits_to_keep=1`` where the model takes it: the prefill needs the last position's logits only."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def classify_rows(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, jobs: list[Job],
                  extra: dict[str, Any], metrics: ServingMetrics) -> None:
    width = max(len(j.input_ids) for j in jobs)
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    ids = torch.full((len(jobs), width), pad_id, dtype=torch.long)  # right padding: (batch, width)
    mask = torch.zeros((len(jobs), width), dtype=torch.long)
    for row, job in enumerate(jobs):
        ids[row, :len(job.input_ids)] = torch.tensor(job.input_ids)
        mask[row, :len(job.input_ids)] = 1
    probabilities = model(input_ids=ids, attention_mask=mask, **extra).logits.float().softmax(-1)  # (batch, labels)
    end = time.monotonic()
    for row, job in enumerate(jobs):
        metrics.prompt_tokens.inc(job.adapter_id, amount=len(job.input_ids))
        metrics.latency.observe(end - job.enqueued, job.adapter_id)
        job.done(probabilities=probabilities[row].tolist(), prompt_tokens=len(job.input_ids), completion_tokens=0)
