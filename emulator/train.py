"""Training and evaluating an adapter: causal LM (loss on the completion only when given) or classification."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from emulator.corpus import prepare_tokenizer
from emulator.data import Example
from emulator.device import autocast, autocast_dtype, to_device
from emulator.errors import EmulatorConfigError
from emulator.multiple_choice import score_choices
from protos.round_config import RoundConfig

IGNORE_INDEX = -100


class TrainConfigError(EmulatorConfigError):
    """An invalid training setting; the message names the field."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    max_steps: int | None = None  # stop early (benchmarks, smoke runs)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise TrainConfigError(f"{{epochs}} must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise TrainConfigError(f"{{lr}} must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise TrainConfigError(f"{{batch_size}} must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            raise TrainConfigError(f"{{max_length}} must be >= 2, got {self.max_length}")

    @classmethod
    def from_round(cls, config: RoundConfig, *, seed: int | None = None) -> TrainConfig:
        """The local training settings of a round (``seed`` overrides the round's, e.g. one per owner)."""
        return cls(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, max_length=config.max_length,
                   seed=config.seed if seed is None else seed)


def collate(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, task: str,
            max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize and pad one batch. Causal LM labels are the inputs, with prompt and padding masked out."""
    prepare_tokenizer(tokenizer)
    if task == "classification":
        batch = tokenizer([e.text for e in examples], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
        return dict(batch)
    rows: list[tuple[list[int], list[int]]] = []
    for example in examples:
        prompt = tokenizer(example.text, add_special_tokens=False)["input_ids"]
        completion = [] if example.completion is None else tokenizer(example.completion,
                                                                      add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion = completion + [tokenizer.eos_token_id] if example.completion is not None else completion
        ids = (prompt + completion)[:max_length]
        targets = [IGNORE_INDEX] * len(prompt) + completion if example.completion is not None else list(prompt)
        rows.append((ids, targets[:max_length]))
    width = max(len(ids) for ids, _ in rows)
    pad = int(tokenizer.pad_token_id)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)  # (B, T)
    label_ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, targets) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        label_ids[i, : len(targets)] = torch.tensor(targets)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids}


def batches(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, task: str, batch_size: int,
            max_length: int, shuffle_seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], tokenizer, task, max_length)


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Mean loss of a batch, the number of items it averages over (tokens or examples), and the logits. The batch
    moves to the model's device."""
    device = next(model.parameters()).device
    batch = to_device(batch, device)
    with autocast(device, autocast_dtype(device)):  # bf16 on CUDA where supported; plain fp32 on CPU
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if task == "classification":
        return nn.functional.cross_entropy(logits, batch["labels"]), len(batch["labels"]), logits
    shifted = logits[:, :-1, :].reshape(-1, logits.shape[-1])  # (B*(T-1), V): position t predicts t+1
    targets = batch["labels"][:, 1:].reshape(-1)
    count = int((targets != IGNORE_INDEX).sum())
    return nn.functional.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX), count, logits


def train(model: nn.Module, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, task: str,
          config: TrainConfig, *, desc: str = "train", show_progress: bool = True) -> dict[str, float]:
    """Train the parameters that require grad; deterministic given ``config.seed``."""
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainConfigError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = steps_per_epoch * config.epochs if config.max_steps is None else config.max_steps
    model.train()
    losses: list[float] = []
    step, tokens, started = 0, 0, time.perf_counter()
    with tqdm(total=total, desc=desc, disable=not show_progress, leave=False) as bar:
        for epoch in range(config.epochs):
            for batch in batches(examples, tokenizer, task, config.batch_size, config.max_length,
                                 shuffle_seed=config.seed * 1000 + epoch):
                loss, _, _ = loss_of(model, batch, task)
                tokens += int(batch["attention_mask"].sum())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                losses.append(loss.item())
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if step >= total:
                    break
            if step >= total:
                break
    model.eval()
    seconds = time.perf_counter() - started
    return {"train_loss": sum(losses) / len(losses), "steps": float(step), "tokens": float(tokens),
            "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, task: str, *,
             batch_size: int = 32, max_length: int = 128, desc: str = "eval",
             show_progress: bool = True) -> dict[str, float]:
    """Accuracy (classification), perplexity (causal LM), or acc and acc_norm with standard errors (multiple
    choice); plus the mean loss where the task has one."""
    if task == "multiple-choice":
        return score_choices(model, examples, tokenizer, batch_size=batch_size, max_length=max_length, desc=desc,
                             show_progress=show_progress).metrics()
    model.eval()
    total_loss, total_count, correct = 0.0, 0, 0
    for batch in tqdm(list(batches(examples, tokenizer, task, batch_size, max_length)), desc=desc,
                      disable=not show_progress, leave=False):
        loss, count, logits = loss_of(model, batch, task)
        total_loss += float(loss) * count
        total_count += count
        if task == "classification":
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    mean_loss = total_loss / max(total_count, 1)
    if task == "classification":
        return {"accuracy": correct / max(total_count, 1), "loss": mean_loss}
    return {"perplexity": math.exp(min(mean_loss, 50.0)), "loss": mean_loss}
