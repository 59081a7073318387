"""A batch's forward passes: greedy decoding with a KV cache and per-row streaming, and classification."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from coordinator.serving.batching import Job
from coordinator.serving.metrics import ServingMetrics


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


def greedy_decode(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, jobs: list[Job],
                  extra: dict[str, Any], metrics: ServingMetrics) -> None:
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    eos = tokenizer.eos_token_id
    ids, mask = _left_padded(jobs, pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    detok = [_Detokenizer(tokenizer) for _ in jobs]
    reasons: list[str | None] = [None] * len(jobs)
    for _step in range(max(j.max_new_tokens for j in jobs)):
        next_ids = out.logits[:, -1, :].argmax(-1)  # (batch,)
        now = time.monotonic()
        for row, job in enumerate(jobs):
            if reasons[row] is not None:
                continue
            token = int(next_ids[row])
            if eos is not None and token == eos:
                reasons[row] = "stop"
                continue
            delta = detok[row].push(token)
            job.token(delta)
            if len(detok[row].ids) >= job.max_new_tokens:
                reasons[row] = "length"
            elif job.deadline is not None and now > job.deadline:
                reasons[row] = "deadline"
        if all(r is not None for r in reasons):
            break
        mask = torch.cat([mask, mask.new_ones((len(jobs), 1))], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=next_ids[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True, **extra)
    end = time.monotonic()
    for row, job in enumerate(jobs):
        generated = len(detok[row].ids)
        metrics.tokens.inc(job.adapter_id, amount=generated)
        metrics.prompt_tokens.inc(job.adapter_id, amount=len(job.input_ids))
        if job.first_token_at is not None:
            metrics.ttft.observe(job.first_token_at - job.enqueued, job.adapter_id)
        if reasons[row] == "deadline":
            metrics.deadline_misses.inc(job.adapter_id)
            job.fail(504, "deadline_exceeded", f"the request's deadline passed after {generated} tokens")
            continue
        metrics.latency.observe(end - job.enqueued, job.adapter_id)
        job.done(text=detok[row].text(), finish_reason=reasons[row] or "length", completion_tokens=generated,
                 prompt_tokens=len(job.input_ids), token_ids=list(detok[row].ids))


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
