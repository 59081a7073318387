"""Build a signed emulator bundle from a full model: split, compress (layer drop by default), save, sign."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from emulator.compress import CompressionPlan, compress, default_plan
from emulator.corpus import Batch
from emulator.gguf_models import GGUF_MODELS, gguf_model_of
from emulator.loading import (
    EMBEDDED_MODEL_NAME,
    embedded_model_path,
    infer_task,
    load_model,
    load_tokenizer,
    resolve_model,
)
from emulator.quantize import count_weights, middle_prefixes, save_emulator
from emulator.quantize import quantize as quantize_emulator
from emulator.split import SplitConfig, SplitError
from emulator.surgery import adapter_spec, count_parameters, extract_adapter
from protos.adapter_spec import AdapterSpec
from protos.bundle import ADAPTER_SPEC_FILE, ADAPTER_WEIGHTS_FILE, EMULATOR_DIR, TOKENIZER_DIR, sign_bundle
from protos.errors import OutputExistsError
from protos.files import utc_timestamp
from protos.manifests import (
    AdapterInfo,
    BaseModelInfo,
    BundleManifest,
    CompressionInfo,
    EmulatorInfo,
    LayerMapEntry,
    QuantizationInfo,
    TokenizerInfo,
)


@dataclass(frozen=True)
class BuildSummary:
    out: Path
    base_model: str
    family: str
    n_layers: int
    full_parameters: int
    emulator_parameters: int
    adapter_parameters: int
    middle_parameters: int
    kept_middle_parameters: int
    kept_middle: list[int]  # the distinct middle blocks the emulator holds
    adapter_blocks: list[int]
    compressors: str = "layer_drop()"  # CompressionPlan.describe()
    shared: dict[int, list[int]] = field(default_factory=dict)  # source block -> emulator slots (share)

    @property
    def compression_ratio(self) -> float:
        """Parameters of the full frozen middle over those the emulator keeps."""
        return self.middle_parameters / max(self.kept_middle_parameters, 1)

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("base model", self.base_model),
            ("family / blocks", f"{self.family} / {self.n_layers}"),
            ("full model parameters", f"{self.full_parameters:,}"),
            ("emulator parameters", f"{self.emulator_parameters:,}"),
            ("adapter parameters", f"{self.adapter_parameters:,}"),
            ("middle parameters (full -> emulator)", f"{self.middle_parameters:,} -> {self.kept_middle_parameters:,}"),
            ("middle compression ratio", f"{self.compression_ratio:.2f}x"),
            ("emulator / full parameters", f"{self.emulator_parameters / self.full_parameters:.3f}"),
            ("adapter blocks (full index)", ", ".join(map(str, self.adapter_blocks))),
            ("kept middle blocks (full index)", ", ".join(map(str, self.kept_middle))),
            ("compressors", self.compressors),
            *([("shared slots (block: emulator slots)",
                "; ".join(f"{b}: {', '.join(map(str, s))}" for b, s in self.shared.items()))] if self.shared else []),
            ("bundle", str(self.out)),
        ]


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: the base model's identity."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_model_id(model: str | None) -> str:
    """What a manifest records as the base model: ``embedded:NAME``, a GGUF model's name, or the path or hub id."""
    if model in GGUF_MODELS:
        return str(model)
    resolved = resolve_model(model)
    return f"embedded:{EMBEDDED_MODEL_NAME}" if Path(resolved) == embedded_model_path() else resolved


def _block_parameters(model: PreTrainedModel, prefix: str, blocks: list[int]) -> int:
    wanted = tuple(f"{prefix}.{i}." for i in blocks)
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(wanted))


def write_bundle(out: Path, key: Ed25519PrivateKey, manifest: BundleManifest, emulator_model: PreTrainedModel,
                 tokenizer: PreTrainedTokenizerBase, spec: AdapterSpec, adapter: dict[str, torch.Tensor], *,
                 quantization: QuantizationInfo | None = None, extra_files: dict[str, bytes] | None = None,
                 force: bool = False) -> BundleManifest:
    """The one bundle writer: emulator, tokenizer, adapter and ``extra_files``, then ``manifest`` (its ``emulator``
    entry filled in here) signed. ``out`` appears only once it is complete; returns the signed manifest."""
    if out.exists() and not force:
        raise OutputExistsError(out)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_emulator(emulator_model, partial / EMULATOR_DIR, quantization)
    tokenizer.save_pretrained(partial / TOKENIZER_DIR)
    (partial / "adapter").mkdir()
    spec.save(partial / ADAPTER_SPEC_FILE)
    save_file(adapter, str(partial / ADAPTER_WEIGHTS_FILE))
    for rel, data in (extra_files or {}).items():
        (partial / rel).write_bytes(data)
    emulator = EmulatorInfo(dir=EMULATOR_DIR, num_parameters=count_weights(emulator_model), quantization=quantization)
    signed = sign_bundle(partial, replace(manifest, emulator=emulator), key)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, out)
    return signed


def build_bundle(
    full: PreTrainedModel,
    tokenizer_source: str,
    model_id: str,
    split: SplitConfig,
    out: Path,
    key: Ed25519PrivateKey,
    *,
    task: str = "base",
    extra_adapter_tensors: tuple[str, ...] = (),
    labels: list[str] | None = None,
    force: bool = False,
    quantize: str = "none",
    compression: CompressionPlan | None = None,
    calibration: Sequence[Batch] | None = None,
) -> BuildSummary:
    """Write a signed bundle for ``full`` at ``out``; the directory appears only once it is complete.

    ``compression`` (default: uniform layer drop with ``split.keep``) runs in order; ``calibration`` replaces the
    default public corpus for compressors that read text (``share``). Shared slots are stored as copies; the layer
    map says which slots hold one source (equal ``full_index``) and whose place each takes (``stands_for``)."""
    if out.exists() and not force:
        raise OutputExistsError(out)
    tokenizer = load_tokenizer(tokenizer_source)
    emulator = compress(full, split, compression, tokenizer=tokenizer, calibration=calibration)
    compression = compression or default_plan(split.keep)
    spec = adapter_spec(full, emulator.location, emulator.plan, extra_tensors=extra_adapter_tensors)
    if quantize != "none" and middle_prefixes(emulator) != [f"{emulator.location.prefix}.{j}"
                                                            for j in emulator.plan.middle_slots]:
        raise SplitError("{quantize} int8 needs the adapter as bottom and top blocks: emulator.quantize does not "
                         "know spread {adapter_blocks} yet")
    quantization = quantize_emulator(emulator, quantize)

    plan, location = emulator.plan, emulator.location
    if task == "classification" and labels is None:  # the checkpoint's own label names
        id2label: dict[int, str] = dict(full.config.id2label or {})  # type: ignore[arg-type, assignment]
        labels = [str(id2label[i]) for i in sorted(id2label)]
    manifest = BundleManifest(
        created_at=utc_timestamp(),
        task=task,
        base_model=BaseModelInfo(
            id=model_id, weights_sha256=state_dict_digest(full), model_type=full.config.model_type,
            class_name=type(full).__name__, family=location.family, blocks_prefix=location.prefix,
            n_layers=location.n_layers, num_parameters=count_parameters(full),
            dequantized_from=gguf.describe() if (gguf := gguf_model_of(model_id)) is not None else None),
        layer_map=[LayerMapEntry(emulator_index=e.emulator_index, full_index=e.full_index, role=e.role,
                                 stands_for=e.stands_for) for e in plan.entries],
        compression=CompressionInfo(method=compression.method, bottom=len(plan.bottom), top=len(plan.top),
                                    keep=len(plan.distinct_middle), kept_middle=plan.distinct_middle,
                                    compressors=compression.to_json(),
                                    adapter_blocks=plan.adapter_blocks if plan.is_spread else None,
                                    shared={str(k): v for k, v in plan.shared.items()} or None),
        adapter=AdapterInfo(method=spec.method, spec_file=ADAPTER_SPEC_FILE, spec_sha256=spec.digest(),
                            weights_file=ADAPTER_WEIGHTS_FILE, num_parameters=spec.num_parameters()),
        tokenizer=TokenizerInfo(dir=TOKENIZER_DIR),
        emulator=EmulatorInfo(dir=EMULATOR_DIR, num_parameters=count_weights(emulator.model),
                              quantization=quantization),
        labels=labels,
    )
    write_bundle(out, key, manifest, emulator.model, tokenizer, spec,
                 extract_adapter(full, spec, from_emulator=False), quantization=quantization, force=force)

    return BuildSummary(
        out=out,
        base_model=model_id,
        family=location.family,
        n_layers=location.n_layers,
        full_parameters=count_parameters(full),
        emulator_parameters=count_weights(emulator.model),
        adapter_parameters=spec.num_parameters(),
        middle_parameters=_block_parameters(full, location.prefix, plan.middle),
        kept_middle_parameters=_block_parameters(full, location.prefix, plan.distinct_middle),
        kept_middle=plan.distinct_middle,
        adapter_blocks=plan.adapter_blocks,
        compressors=compression.describe(),
        shared=plan.shared,
    )


def build_bundle_from_model(model: str | None, split: SplitConfig, out: Path, key: Ed25519PrivateKey, *,
                            task: str = "auto", force: bool = False, quantize: str = "none",
                            compression: CompressionPlan | None = None) -> BuildSummary:
    """Load ``model`` (a path, hub id, or None for the embedded MiniLM) and build its bundle."""
    source = resolve_model(model)
    task = infer_task(source) if task == "auto" else task
    full = load_model(source, task)
    return build_bundle(full, source, base_model_id(model), split, out, key, task=task, force=force,
                        quantize=quantize, compression=compression)
