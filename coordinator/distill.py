"""Distil a bundle's emulator toward the coordinator's full model and write a new signed bundle."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import load_file
from transformers import PreTrainedModel

from coordinator.bundle_models import bundle_emulator, check_base_model, load_full_model, open_bundle
from coordinator.bundles import write_bundle
from coordinator.errors import InvalidSettingError
from emulator.corpus import corpus_digest, default_corpus, prepare_tokenizer, read_documents, split_documents
from emulator.distill import DistillConfig, DistillResult, distill
from emulator.loading import load_tokenizer
from emulator.quantize import quantize
from emulator.surgery import extract_adapter
from protos.bundle import VerifiedBundle
from protos.errors import OutputExistsError
from protos.files import utc_timestamp
from protos.manifests import CorpusInfo, DistillationInfo

CURVE_FILE = "distill_curve.json"


def distill_bundle(bundle: Path | VerifiedBundle, full: PreTrainedModel | None, corpus: Sequence[Path] | None,
                   out: Path, config: DistillConfig, key: Ed25519PrivateKey, *, model: str | None = None,
                   quantize_method: str = "none", resume: bool = False, work_dir: Path | None = None,
                   stop_after: int | None = None, progress: bool = True, force: bool = False) -> DistillResult:
    """Distil the emulator of ``bundle`` on ``corpus`` (default: the shipped public corpus) and write the best
    student as a new bundle at ``out``, signed with ``key``. Checkpoints live in ``work_dir`` (``OUT.work``),
    removed once the bundle is written. Returns early, writing nothing, when ``stop_after`` ends the run."""
    # -- setup
    if out.exists() and not force:
        raise OutputExistsError(out)
    verified = open_bundle(bundle, key.public_key())
    if verified.manifest.emulator.quantization is not None:
        raise InvalidSettingError("{bundle}: its emulator is quantized; distil a plain bundle "
                                  "(then quantize with {quantize} int8)")
    if full is None:
        full = load_full_model(verified, model)
    check_base_model(verified, full)
    emulator = bundle_emulator(verified, full)
    spec = verified.adapter_spec
    if any(not torch.equal(a, b) for a, b in zip(extract_adapter(emulator.model, spec, from_emulator=True).values(),
                                                   extract_adapter(full, spec, from_emulator=False).values(),
                                                   strict=True)):
        raise InvalidSettingError("{bundle}: the emulator's adapter blocks differ from the full model's: "
                                  "not a fresh bundle")
    corpus_paths = [Path(p) for p in corpus] if corpus else [default_corpus()]
    train_docs, held_docs = split_documents(read_documents(corpus_paths), config.held_out_percent)
    tokenizer = prepare_tokenizer(load_tokenizer(str(verified.tokenizer_dir)))
    digest = corpus_digest(corpus_paths)
    work_dir = work_dir or out.with_name(out.name + ".work")

    # -- train
    result = distill(full, emulator, tokenizer, train_docs, held_docs, config, work_dir,
                     causal=verified.manifest.is_causal, resume=resume, stop_after=stop_after, progress=progress,
                     meta={"corpus_sha256": digest, "source_bundle": verified.digest})
    if not result.finished:
        return result

    # -- save
    quantization = quantize(emulator, quantize_method)
    distillation = DistillationInfo(
        settings=asdict(config),
        corpus=CorpusInfo(files=[p.name for p in corpus_paths], sha256=digest,
                          documents=len(train_docs) + len(held_docs), held_out=len(held_docs)),
        source_bundle_sha256=verified.digest, best_step=result.best_step,
        held_out_loss=result.best_held_out_loss, held_out=result.held_out, held_out_layer_drop=result.held_out_start,
        curve_file=CURVE_FILE)
    manifest = replace(verified.manifest, created_at=utc_timestamp(), files={}, signer=None, signature=None,
                       compression=replace(verified.manifest.compression, distillation=distillation))
    curve = json.dumps({"curve": result.curve, "best_step": result.best_step}, indent=1).encode()
    write_bundle(out, key, manifest, emulator.model, load_tokenizer(str(verified.tokenizer_dir)), spec,
                 load_file(str(verified.adapter_weights)), quantization=quantization,
                 extra_files={CURVE_FILE: curve}, force=force)
    # -- cleanup
    shutil.rmtree(work_dir, ignore_errors=True)
    return result
