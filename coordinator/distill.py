"""Distil a bundle's emulator toward the coordinator's full model and write a new signed bundle."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors.torch import load_file
from transformers import PreTrainedModel

from coordinator.bundles import now_utc, state_dict_digest, write_bundle
from emulator.corpus import corpus_digest, default_corpus, prepare_tokenizer, read_documents, split_documents
from emulator.distill import DistillConfig, DistillResult, distill
from emulator.families import locate_blocks
from emulator.loading import embedded_model_path, load_model, load_tokenizer, resolve_model
from emulator.quantize import load_emulator, quantize
from emulator.split import LayerPlan, SplitConfig
from emulator.surgery import Emulator, extract_adapter
from protos.bundle import VerifiedBundle, verify_bundle

CURVE_FILE = "distill_curve.json"
_NOT_COPIED = ("files", "signer", "signature", "format_version", "emulator")


class BaseModelMismatchError(ValueError):
    """The full model is not the one the bundle was built from."""


def open_bundle(bundle: Path | VerifiedBundle, public_key: Ed25519PublicKey) -> VerifiedBundle:
    return bundle if isinstance(bundle, VerifiedBundle) else verify_bundle(Path(bundle), public_key)


def model_source(verified: VerifiedBundle, model: str | None) -> str:
    """Where the bundle's full model lives: ``--model``, else the manifest's ``base_model.id``."""
    source = model or str(verified.manifest["base_model"]["id"])
    return str(embedded_model_path()) if source.startswith("embedded:") else resolve_model(source)


def check_base_model(verified: VerifiedBundle, full: PreTrainedModel) -> None:
    expected = verified.manifest["base_model"]["weights_sha256"]
    if state_dict_digest(full) != expected:
        raise BaseModelMismatchError(f"--model: the full model's weights differ from the bundle's base model "
                                     f"(sha256 {expected[:16]}...)")


def load_full_model(verified: VerifiedBundle, model: str | None = None) -> PreTrainedModel:
    """The coordinator's full model for ``verified``, checked against the manifest's weights digest."""
    full = load_model(model_source(verified, model), str(verified.manifest.get("task", "base")))
    check_base_model(verified, full)
    return full


def split_of(manifest: dict[str, Any]) -> SplitConfig:
    compression = manifest["compression"]
    return SplitConfig(int(compression["bottom"]), int(compression["top"]), int(compression["keep"]))


def bundle_emulator(verified: VerifiedBundle, full: PreTrainedModel) -> Emulator:
    location = locate_blocks(full)
    plan = LayerPlan.from_json(location.n_layers, verified.manifest["layer_map"])
    return Emulator(load_emulator(verified), plan, location)


def is_causal(verified: VerifiedBundle) -> bool:
    return verified.manifest.get("task") == "causal-lm"


def distill_bundle(bundle: Path | VerifiedBundle, full: PreTrainedModel | None, corpus: Sequence[Path] | None,
                   out: Path, config: DistillConfig, key: Ed25519PrivateKey, *, model: str | None = None,
                   quantize_method: str = "none", resume: bool = False, work_dir: Path | None = None,
                   stop_after: int | None = None, progress: bool = True, force: bool = False) -> DistillResult:
    """Distil the emulator of ``bundle`` on ``corpus`` (default: the shipped public corpus) and write the best
    student as a new bundle at ``out``, signed with ``key``. Checkpoints live in ``work_dir`` (``OUT.work``),
    removed once the bundle is written. Returns early, writing nothing, when ``stop_after`` ends the run."""
    # -- setup
    if out.exists() and not force:
        raise FileExistsError(f"--out {out} already exists; pass --force to replace it")
    verified = open_bundle(bundle, key.public_key())
    if verified.manifest.get("emulator", {}).get("quantization"):
        raise ValueError("the bundle's emulator is quantized; distil a plain bundle (then pass --quantize int8)")
    if full is None:
        full = load_full_model(verified, model)
    check_base_model(verified, full)
    emulator = bundle_emulator(verified, full)
    spec = verified.adapter_spec
    if any(not torch.equal(a, b) for a, b in zip(extract_adapter(emulator.model, spec, from_emulator=True).values(),
                                                   extract_adapter(full, spec, from_emulator=False).values(),
                                                   strict=True)):
        raise ValueError("the bundle's emulator adapter blocks differ from the full model's: not a fresh bundle")
    corpus_paths = [Path(p) for p in corpus] if corpus else [default_corpus()]
    train_docs, held_docs = split_documents(read_documents(corpus_paths), config.held_out_percent)
    tokenizer = prepare_tokenizer(load_tokenizer(str(verified.tokenizer_dir)))
    digest = corpus_digest(corpus_paths)
    work_dir = work_dir or out.with_name(out.name + ".work")

    # -- train
    result = distill(full, emulator, tokenizer, train_docs, held_docs, config, work_dir, causal=is_causal(verified),
                     resume=resume, stop_after=stop_after, progress=progress,
                     meta={"corpus_sha256": digest, "source_bundle": verified.digest})
    if not result.finished:
        return result

    # -- save
    quantization = quantize(emulator, quantize_method)
    fields = {k: v for k, v in verified.manifest.items() if k not in _NOT_COPIED}
    fields["created_at"] = now_utc()
    fields["compression"] = {**fields["compression"], "distillation": {
        "settings": asdict(config),
        "corpus": {"files": [p.name for p in corpus_paths], "sha256": digest,
                   "documents": len(train_docs) + len(held_docs), "held_out": len(held_docs)},
        "source_bundle_sha256": verified.digest,
        "best_step": result.best_step,
        "held_out_loss": result.best_held_out_loss,
        "held_out": result.held_out,
        "held_out_layer_drop": result.held_out_start,
        "curve_file": CURVE_FILE,
    }}
    curve = json.dumps({"curve": result.curve, "best_step": result.best_step}, indent=1).encode()
    write_bundle(out, key, fields, emulator.model, load_tokenizer(str(verified.tokenizer_dir)), spec,
                 load_file(str(verified.adapter_weights)), quantization=quantization,
                 extra_files={CURVE_FILE: curve}, force=force)
    # -- cleanup
    shutil.rmtree(work_dir, ignore_errors=True)
    return result
