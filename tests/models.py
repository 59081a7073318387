"""Tiny random transformers models, built from configs (no hub), one per supported family."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128
N_LAYERS = 6
_DECODER = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

FACTORIES: dict[str, Callable[[], PreTrainedModel]] = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=N_LAYERS, n_embd=32, n_head=4, n_positions=64, **_DECODER)),
    "opt": lambda: OPTForCausalLM(
        OPTConfig(num_hidden_layers=N_LAYERS, hidden_size=32, ffn_dim=64, num_attention_heads=4,
                  word_embed_proj_dim=32, max_position_embeddings=64, **_DECODER)
    ),
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(num_hidden_layers=N_LAYERS, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, **_DECODER)
    ),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(num_hidden_layers=N_LAYERS, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, **_DECODER)
    ),
    "mistral": lambda: MistralForCausalLM(
        MistralConfig(num_hidden_layers=N_LAYERS, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, **_DECODER)
    ),
    "bloom": lambda: BloomForCausalLM(BloomConfig(n_layer=N_LAYERS, hidden_size=32, n_head=4, **_DECODER)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(num_hidden_layers=N_LAYERS, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      max_position_embeddings=64, **_DECODER)
    ),
    "bert": lambda: BertModel(
        BertConfig(num_hidden_layers=N_LAYERS, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                   vocab_size=VOCAB, max_position_embeddings=64)
    ),
    # Not in the family registry: found by structure (the longest ModuleList of identical blocks).
    "gptj": lambda: GPTJForCausalLM(
        GPTJConfig(n_layer=N_LAYERS, n_embd=32, n_head=4, rotary_dim=4, n_positions=64, **_DECODER)
    ),
}
FAMILIES = sorted(FACTORIES)


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = FACTORIES[family]()
    return model.eval()


def model_output(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits for language models, the last hidden state for encoders."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def tiny_classifier_dir(path: Path) -> Path:
    """A tiny random BERT classifier with MiniLM's real tokenizer: a real transformers model that trains fast."""
    from emulator.loading import embedded_model_path

    config = BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(path)
    return path


def subset(source: Path, target: Path, lines: int) -> Path:
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:lines]))
    return target


def tiny_causal_dir(path: Path) -> Path:
    """A tiny random GPT-2 over MiniLM's real tokenizer (vocab 30522): a causal LM that trains in seconds."""
    from emulator.loading import embedded_model_path

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, n_positions=128, vocab_size=30522)).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(path)
    return path


def tiny_llama_dir(path: Path, n_layers: int = 6) -> Path:
    """A tiny random LLaMA (SmolLM2's architecture) over MiniLM's real tokenizer: a causal LM that trains fast."""
    from emulator.loading import embedded_model_path

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=n_layers, hidden_size=32, intermediate_size=64,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 vocab_size=30522, pad_token_id=0, bos_token_id=101, eos_token_id=102,
                                 tie_word_embeddings=True)).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(path)
    return path
