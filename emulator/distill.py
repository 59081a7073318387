"""Distil the emulator's kept middle blocks toward the full model's middle blocks (Offsite-Tuning, sec. 3.3).

Teacher and student both run whole (the bottom adapter blocks are shared and frozen, so both middles see the same
input); the loss matches hidden states at the end of the middle, optionally after every kept block.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emulator.checkpoint import load_checkpoint, load_optimizer_tensors, optimizer_tensors, save_checkpoint
from emulator.corpus import Batch, batch_at, encode, eval_batches
from emulator.errors import EmulatorConfigError
from emulator.fidelity import hidden_fidelity, hidden_states, lm_labels, mean_lm_loss, normalized_mse
from emulator.surgery import Emulator


class DistillConfigError(EmulatorConfigError):
    """An invalid distillation setting; the message names the field."""


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 300
    lr: float = 1e-4  # the paper's AdamW lr, cosine decay after a linear warmup
    batch_size: int = 8
    seq_len: int = 128
    eval_every: int = 50  # held-out evaluation and checkpoint every N steps
    warmup_steps: int = 0  # 0: 5% of --steps
    kd_weight: float = 30.0
    lm_weight: float = 1.0  # causal models only
    per_block: bool = False  # also match the output of every kept middle block
    weight_decay: float = 0.0
    held_out_percent: int = 10
    eval_docs: int = 64  # held-out documents scored at each evaluation
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value in (("steps", self.steps), ("batch_size", self.batch_size), ("seq_len", self.seq_len),
                            ("eval_every", self.eval_every), ("eval_docs", self.eval_docs)):
            if value < 1:
                raise DistillConfigError(f"{{{name}}} must be >= 1, got {value}")
        if not self.lr > 0:
            raise DistillConfigError(f"{{lr}} must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise DistillConfigError(f"{{warmup_steps}} must be in [0, {{steps}}), got {self.warmup_steps}")
        if self.kd_weight < 0 or self.lm_weight < 0 or self.kd_weight + self.lm_weight == 0:
            raise DistillConfigError("{kd_weight} and {lm_weight} must be >= 0 and not both 0")
        if not 1 <= self.held_out_percent <= 50:
            raise DistillConfigError(f"{{held_out_percent}} must be in [1, 50], got {self.held_out_percent}")

    @property
    def warmup(self) -> int:
        return self.warmup_steps or max(1, self.steps // 20)

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay to 0 at ``steps``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class DistillResult:
    best_step: int
    best_held_out_loss: float
    held_out: dict[str, float]  # the best student's held-out normalised error / cosine at the middle's output
    held_out_start: dict[str, float]  # the same for plain layer drop (step 0)
    curve: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation
    steps_run: int = 0  # steps run in this call (fewer than ``steps`` after a resume or ``stop_after``)
    seconds: float = 0.0
    finished: bool = True


def match_pairs(emulator: Emulator, per_block: bool) -> list[tuple[int, int]]:
    """(emulator, full) hidden-state indices to match; ``hidden_states[i]`` is the input of block ``i``.

    Kept block j stands in for full blocks ``kept[j] .. kept[j+1]-1``, so its output should be the full model's
    hidden state at ``kept[j+1]``; the last kept block's output, the end of the full middle.
    """
    pairs = emulator.plan.middle_targets  # spread adapters and shared slots included
    return pairs if per_block else pairs[-1:]


def student_parameters(emulator: Emulator) -> dict[str, torch.nn.Parameter]:
    """Freeze everything but the kept middle blocks; return those, by name."""
    plan, prefix = emulator.plan, emulator.location.prefix
    wanted = tuple(f"{prefix}.{j}." for j in plan.middle_slots)
    trainable = {}
    for name, param in emulator.model.named_parameters():
        param.requires_grad_(name.startswith(wanted))
        if param.requires_grad:
            trainable[name] = param
    return trainable


def distill_loss(full: PreTrainedModel, emulator: Emulator, batch: Batch, config: DistillConfig, causal: bool,
                 pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, float]:
    """(kd_weight * KD + lm_weight * LM, KD at the middle's output)."""
    with torch.no_grad():
        teacher = hidden_states(full, batch)  # n_layers + 1 of (B, T, D)
    if causal and config.lm_weight > 0:
        out = emulator.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=lm_labels(batch),
                             output_hidden_states=True)
        student, lm = out.hidden_states, out.loss
    else:
        student, lm = hidden_states(emulator.model, batch), None
    kd_terms = [normalized_mse(teacher[t], student[s], batch.attention_mask) for s, t in pairs]
    kd = torch.stack(kd_terms).mean()
    loss = config.kd_weight * kd + (config.lm_weight * lm if lm is not None else 0.0)
    return loss, kd_terms[-1].item()


def evaluate(full: PreTrainedModel, emulator: Emulator, tokenizer: PreTrainedTokenizerBase, docs: list[str],
             config: DistillConfig, causal: bool) -> dict[str, float]:
    """Held-out fidelity at the middle's output, and the selection loss ``kd_weight * error (+ lm_weight * LM)``."""
    batches = list(eval_batches(tokenizer, docs[: config.eval_docs], config.batch_size, config.seq_len))
    emu_index, full_index = match_pairs(emulator, per_block=False)[0]
    scores = hidden_fidelity(full, emulator.model, batches, full_index, emu_index)
    scores["loss"] = config.kd_weight * scores["normalized_error"]
    if causal and config.lm_weight > 0:
        scores["lm_loss"] = mean_lm_loss(emulator.model, batches)
        scores["loss"] += config.lm_weight * scores["lm_loss"]
    return scores


def distill(full: PreTrainedModel, emulator: Emulator, tokenizer: PreTrainedTokenizerBase, train_docs: list[str],
            held_docs: list[str], config: DistillConfig, work_dir: Path, *, causal: bool, resume: bool = False,
            stop_after: int | None = None, progress: bool = True, meta: dict[str, Any] | None = None) -> DistillResult:
    """Train the emulator's kept middle blocks in place; on return it holds the best held-out checkpoint.

    Checkpoints go to ``work_dir`` every ``eval_every`` steps; ``resume`` continues from the last one exactly.
    ``stop_after`` ends this call after that many steps, as a killed run would (tests and time-boxed jobs).
    """
    # -- setup
    started = time.perf_counter()
    full.eval()
    emulator.model.eval()  # no dropout: the teacher is deterministic and so is the student
    params = student_parameters(emulator)
    names = sorted(params)
    optimizer = torch.optim.AdamW([params[n] for n in names], lr=config.lr, weight_decay=config.weight_decay)
    pairs = match_pairs(emulator, config.per_block)
    settings = {"config": asdict(config), **(meta or {})}

    step, running_kd = 0, float("nan")
    best: dict[str, Any] = {}
    curve: list[dict[str, float]] = []
    checkpoint = load_checkpoint(work_dir) if resume else None
    if checkpoint is not None:
        tensors, state = checkpoint
        if state["settings"] != settings:
            raise DistillConfigError(f"{{resume}}: the checkpoint in {work_dir} was made with other settings "
                                     f"(or another corpus or bundle); start over without {{resume}}")
        with torch.no_grad():
            for n in names:
                params[n].copy_(tensors[f"student/{n}"])
        load_optimizer_tensors(optimizer, tensors)
        torch.set_rng_state(tensors["rng/torch"])
        step, curve, running_kd = state["step"], state["curve"], state["running_kd"]
        best = {"step": state["best_step"], "loss": state["best_loss"], "scores": state["best_scores"],
                "start": state["start_scores"], "weights": {n: tensors[f"best/{n}"] for n in names}}
    else:
        torch.manual_seed(config.seed)
        scores = evaluate(full, emulator, tokenizer, held_docs, config, causal)
        curve.append({"step": 0, **scores})
        best = {"step": 0, "loss": scores["loss"], "scores": scores, "start": scores,
                "weights": {n: params[n].detach().clone() for n in names}}

    def checkpoint_now() -> None:
        tensors = {f"student/{n}": params[n].detach() for n in names}
        tensors |= {f"best/{n}": w for n, w in best["weights"].items()}
        tensors |= optimizer_tensors(optimizer) | {"rng/torch": torch.get_rng_state()}
        save_checkpoint(work_dir, tensors, {
            "settings": settings, "step": step, "data_position": step * config.batch_size, "curve": curve,
            "best_step": best["step"], "best_loss": best["loss"], "best_scores": best["scores"],
            "start_scores": best["start"], "running_kd": running_kd,
        })

    # -- train
    first = step
    last = config.steps if stop_after is None else min(config.steps, first + stop_after)
    bar = tqdm(range(first, last), initial=first, total=config.steps, desc="distill", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        batch = encode(tokenizer, batch_at(train_docs, step, config.batch_size, config.seed), config.seq_len)
        loss, kd = distill_loss(full, emulator, batch, config, causal, pairs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running_kd = kd if math.isnan(running_kd) else 0.9 * running_kd + 0.1 * kd
        step += 1  # steps done
        if step % config.eval_every == 0 or step == config.steps:
            scores = evaluate(full, emulator, tokenizer, held_docs, config, causal)
            curve.append({"step": step, "train_kd": running_kd, "lr": config.lr_at(step - 1), **scores})
            if scores["loss"] < best["loss"]:
                best = {**best, "step": step, "loss": scores["loss"], "scores": scores,
                        "weights": {n: params[n].detach().clone() for n in names}}
            checkpoint_now()
        bar.set_postfix(kd=f"{running_kd:.4f}", best=f"{best['loss']:.4f}@{best['step']}")
    bar.close()
    if step != first and step % config.eval_every != 0 and step != config.steps:
        checkpoint_now()  # a stop between evaluations still leaves an exact resume point

    # -- the best student
    with torch.no_grad():
        for n in names:
            params[n].copy_(best["weights"][n])
    for param in emulator.model.parameters():
        param.requires_grad_(False)
    return DistillResult(best_step=best["step"], best_held_out_loss=best["loss"], held_out=best["scores"],
                         held_out_start=best["start"], curve=curve, steps_run=step - first,
                         seconds=time.perf_counter() - started, finished=step >= config.steps)
