"""How closely an emulator follows the full model: hidden-state error and cosine, and perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from emulator.corpus import Batch


def normalized_mse(h_t: torch.Tensor, h_s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The paper's KD loss ``mean(((h_T - h_S) / sqrt(mean(h_T^2)))^2)`` over non-padding positions and dims.

    h_t, h_s: (B, T, D) teacher / student hidden states; mask: (B, T), 1 on real tokens.
    """
    m = mask[..., None].to(h_t.dtype)  # (B, T, 1)
    n = m.sum() * h_t.shape[-1]  # non-padding elements
    scale = (h_t.pow(2) * m).sum() / n  # mean(h_T^2)
    return ((h_t - h_s).pow(2) * m).sum() / n / scale


def hidden_states(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, ...]:
    """All hidden states of the model's body; ``[i]`` is the input of block ``i``, ``[-1]`` the final one."""
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return tuple(out.hidden_states)


@torch.no_grad()
def hidden_fidelity(full: PreTrainedModel, emulator: PreTrainedModel, batches: Iterable[Batch],
                    full_index: int = -1, emulator_index: int = -1) -> dict[str, float]:
    """``normalized_error = sum((h_full - h_emu)^2) / sum(h_full^2)`` and the mean per-token cosine similarity,
    pooled over every non-padding token of ``batches``; by default on the final hidden states."""
    err = ref = cos = tokens = 0.0
    for batch in batches:
        h_f = hidden_states(full, batch)[full_index]  # (B, T, D)
        h_e = hidden_states(emulator, batch)[emulator_index]  # (B, T, D)
        m = batch.attention_mask.bool()  # (B, T)
        err += (h_f - h_e)[m].pow(2).sum().item()
        ref += h_f[m].pow(2).sum().item()
        cos += F.cosine_similarity(h_f[m], h_e[m], dim=-1).sum().item()
        tokens += m.sum().item()
    return {"normalized_error": err / ref, "cosine": cos / tokens}


def lm_labels(batch: Batch) -> torch.Tensor:
    """Next-token labels: the inputs, with padding ignored (-100)."""
    return batch.input_ids.masked_fill(batch.attention_mask == 0, -100)


@torch.no_grad()
def mean_lm_loss(model: PreTrainedModel, batches: Iterable[Batch]) -> float:
    """Token-weighted mean next-token cross-entropy of a causal LM."""
    total = count = 0.0
    for batch in batches:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (B, T, V)
        labels = lm_labels(batch)[:, 1:]  # (B, T-1)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        total += nll.item()
        count += (labels != -100).sum().item()
    return total / max(count, 1.0)


def perplexity(model: PreTrainedModel, batches: Iterable[Batch]) -> float:
    return math.exp(mean_lm_loss(model, batches))
