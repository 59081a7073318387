"""Shared helpers for the distillation / quantization / fidelity tests: tiny models saved as local model dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from emulator.loading import embedded_model_path, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
VOCAB = 30522  # the embedded MiniLM's WordPiece tokenizer serves the tiny models too


def tiny_gpt2(seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=6, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = BertConfig(num_hidden_layers=6, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                        vocab_size=VOCAB, max_position_embeddings=64)
    return BertModel(config).eval()


def save_model_dir(model: PreTrainedModel, directory: Path) -> Path:
    """A local model directory (weights + the MiniLM tokenizer), loadable by ``emulator.loading.load_model``."""
    model.save_pretrained(directory)
    load_tokenizer(str(embedded_model_path())).save_pretrained(directory)
    return directory


def corpus_file(directory: Path, n: int = 60) -> Path:
    """A small .jsonl corpus: sentences with varied lengths, so batches have padding."""
    words = "the model owner splits a network into adapter blocks and a frozen middle emulator".split()
    lines = []
    for i in range(n):
        text = " ".join(words[(i * 7 + j) % len(words)] for j in range(5 + i % 17))
        lines.append(json.dumps({"text": f"{text} {i}"}))
    path = directory / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
