"""Multiple-choice scoring as lm-eval-harness does it: each choice's log-likelihood given the prompt.

``acc`` picks the choice with the highest summed log-probability of its tokens; ``acc_norm`` divides each sum by the
choice's length in characters first (so longer choices are not penalised for having more tokens). Standard errors
are the sample standard error of the per-item 0/1 scores, ``sqrt(p (1 - p) / (n - 1))``, as lm-eval reports them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from emulator.corpus import prepare_tokenizer
from emulator.data import Example
from emulator.device import autocast, autocast_dtype


@dataclass(frozen=True)
class ChoiceScores:
    loglik: list[list[float]]  # per item, per choice: summed log p(choice tokens | prompt)
    answers: list[int]
    lengths: list[list[int]]  # per item, per choice: characters

    def _accuracy(self, normalise: bool) -> list[float]:
        hits = []
        for scores, lengths, answer in zip(self.loglik, self.lengths, self.answers, strict=True):
            values = [s / max(n, 1) for s, n in zip(scores, lengths, strict=True)] if normalise else scores
            hits.append(float(max(range(len(values)), key=values.__getitem__) == answer))
        return hits

    def metrics(self) -> dict[str, float]:
        acc, acc_norm = self._accuracy(False), self._accuracy(True)
        return {"acc": mean(acc), "acc_stderr": stderr(acc), "acc_norm": mean(acc_norm),
                "acc_norm_stderr": stderr(acc_norm), "n": float(len(acc))}


def mean(values: Sequence[float]) -> float:
    return sum(values) / max(len(values), 1)


def stderr(values: Sequence[float]) -> float:
    """Sample standard error of the mean (lm-eval's ``mean_stderr``)."""
    n = len(values)
    if n < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def _pairs(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase,
           max_length: int) -> list[tuple[list[int], int]]:
    """(input ids, number of choice tokens at the end) per (item, choice); long prompts lose their start."""
    pairs = []
    for example in examples:
        prompt = tokenizer(example.text, add_special_tokens=False)["input_ids"]
        if not prompt:  # the first choice token needs something to be predicted from
            prompt = [int(tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)]
        for choice in example.choices:
            target = tokenizer(choice, add_special_tokens=False)["input_ids"][: max_length - 1]
            ids = (prompt + target)[-max_length:]
            pairs.append((ids, len(target)))
    return pairs


@torch.no_grad()
def score_choices(model: nn.Module, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *,
                  batch_size: int = 32, max_length: int = 128, desc: str = "choices",
                  show_progress: bool = True) -> ChoiceScores:
    """Summed log-likelihood of every choice of every item under ``model`` (a causal LM)."""
    prepare_tokenizer(tokenizer)
    model.eval()
    device = next(model.parameters()).device
    pairs = _pairs(examples, tokenizer, max_length)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))  # similar lengths share a batch: less padding
    sums = [0.0] * len(pairs)
    pad = int(tokenizer.pad_token_id)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress, leave=False):
        chunk = order[start : start + batch_size]
        width = max(len(pairs[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(pairs[i][0])] = torch.tensor(pairs[i][0])
            mask[row, : len(pairs[i][0])] = 1
        with autocast(device, autocast_dtype(device)):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V): position t predicts token t+1
        token_lp = logprobs.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()  # (B, T-1)
        for row, i in enumerate(chunk):
            length, n_target = len(pairs[i][0]), pairs[i][1]
            sums[i] = float(token_lp[row, length - 1 - n_target : length - 1].sum())
    loglik, lengths, cursor = [], [], 0
    for example in examples:
        loglik.append(sums[cursor : cursor + len(example.choices)])
        lengths.append([len(c) for c in example.choices])
        cursor += len(example.choices)
    return ChoiceScores(loglik, [int(e.answer if e.answer is not None else -1) for e in examples], lengths)
