"""The fidelity report: how well the plain layer-drop and the distilled emulators follow the full model, their
memory, in fp32 and int8, and the distillation curve as a PNG."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from transformers import PreTrainedModel

from coordinator.bundle_models import bundle_emulator, check_base_model, load_full_model, open_bundle, split_of
from coordinator.distill import CURVE_FILE
from emulator.corpus import (
    corpus_digest,
    default_corpus,
    eval_batches,
    prepare_tokenizer,
    read_documents,
    split_documents,
)
from emulator.distill import DistillConfig
from emulator.fidelity import hidden_fidelity, perplexity
from emulator.loading import load_tokenizer
from emulator.quantize import model_bytes, quantize
from emulator.surgery import Emulator, build_emulator
from protos.bundle import VerifiedBundle


def report_documents(verified: VerifiedBundle, corpus: Sequence[Path] | None) -> list[str]:
    """A held-out corpus as given; the distillation corpus itself (or none: the default corpus) gives its held-out
    slice, the documents distillation never trained on."""
    distillation = verified.manifest.compression.distillation
    paths = [Path(p) for p in corpus] if corpus else [default_corpus()]
    if corpus and (distillation is None or distillation.corpus.sha256 != corpus_digest(paths)):
        return read_documents(paths)
    settings = DistillConfig() if distillation is None else DistillConfig(**distillation.settings)
    return split_documents(read_documents(paths), settings.held_out_percent)[1]


def fidelity_report(bundle: Path | VerifiedBundle, public_key: Ed25519PublicKey, *, full: PreTrainedModel | None = None,
                    model: str | None = None, corpus: Sequence[Path] | None = None, max_docs: int = 64,
                    batch_size: int = 16, seq_len: int = 128, int8: bool = True) -> dict[str, dict[str, Any]]:
    """One object per variant: ``full``, ``layer_drop``, ``distilled`` (only for a distilled bundle) and, with
    ``int8``, ``layer_drop_int8`` / ``distilled_int8``. Causal models get ``perplexity``; encoders get
    ``normalized_error`` and ``cosine`` of the final hidden states against the full model (padding excluded).
    Every variant gets ``memory.param_bytes`` (parameter + buffer bytes)."""
    verified = open_bundle(bundle, public_key)
    if full is None:
        full = load_full_model(verified, model)
    check_base_model(verified, full)
    tokenizer = prepare_tokenizer(load_tokenizer(str(verified.tokenizer_dir)))
    batches = list(eval_batches(tokenizer, report_documents(verified, corpus)[:max_docs], batch_size, seq_len))
    causal = verified.manifest.is_causal
    bundle_is_int8 = verified.manifest.emulator.quantization is not None

    variants: dict[str, Emulator] = {"layer_drop": build_emulator(full, split_of(verified))}
    if verified.manifest.compression.distillation is not None:
        variants["distilled"] = bundle_emulator(verified, full)
    if int8:
        for name in list(variants):
            if bundle_is_int8 and name == "distilled":
                continue  # the bundle's emulator is already int8
            quantized = copy.deepcopy(variants[name])
            quantize(quantized)
            variants[f"{name}_int8"] = quantized

    report: dict[str, dict[str, Any]] = {}
    report["full"] = {"perplexity": perplexity(full, batches)} if causal else {"normalized_error": 0.0, "cosine": 1.0}
    report["full"]["memory"] = {"param_bytes": model_bytes(full)}
    for name, emulator in variants.items():
        scores = {"perplexity": perplexity(emulator.model, batches)} if causal else \
            hidden_fidelity(full, emulator.model, batches)
        is_int8 = name.endswith("_int8") or (bundle_is_int8 and name == "distilled")
        report[name] = {**scores, "quantization": "int8" if is_int8 else "none",
                        "memory": {"param_bytes": model_bytes(emulator.model)}}
    return report


def read_curve(verified: VerifiedBundle) -> list[dict[str, float]]:
    path = verified.root / CURVE_FILE
    return list(json.loads(path.read_text())["curve"]) if path.is_file() else []


def plot_curve(curve: list[dict[str, float]], png: Path, title: str = "emulator distillation") -> Path:
    """Held-out normalised error (and perplexity-free loss) against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c["step"] for c in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [c["normalized_error"] for c in curve], marker="o", label="held-out normalised error")
    train = [(c["step"], c["train_kd"]) for c in curve if "train_kd" in c]
    if train:
        ax.plot(*zip(*train, strict=True), linestyle="--", label="train KD (running mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("normalised error at the middle's output")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png

