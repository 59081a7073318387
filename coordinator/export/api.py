"""``offsite-coordinator export``: a finished run's tuned adapter as files other stacks load, signed.

- ``safetensors``: the plugged full model and its tokenizer (``save_pretrained``), loadable with plain transformers;
- ``peft``: a LoRA job's adapter directory for ``PeftModel.from_pretrained(base, OUT)``; for ``layers`` and
  ``bitfit`` jobs the adapter's tensors as safetensors with a layer map (recorded as format ``layers``);
- ``onnx``: the plugged model as one graph, or for LoRA jobs one base graph plus an ``.onnx_adapter`` file.

The export is staged in a sibling directory and renamed into place once signed: an interrupted export leaves
nothing at OUT.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save_file

from coordinator.errors import InvalidSettingError
from coordinator.export.layers_map import ADAPTER_WEIGHTS, LAYERS_MAP, LayersMap
from coordinator.export.manifest import ExportManifest, sign_export
from coordinator.export.run_source import RunSource, load_run
from emulator.loading import load_tokenizer
from emulator.methods import lora_config_for, peft_state_dict
from protos import crypto
from protos.errors import OutputExistsError
from protos.files import utc_timestamp

EXPORT_FORMATS = ("safetensors", "peft", "onnx", "adapter")  # adapter: peft for LoRA jobs, layers otherwise
PARITY_FILE = "onnx-parity.json"


def _blocks(source: RunSource) -> list[int]:
    return sorted({entry.full_index for entry in source.bundle.manifest.layer_map if entry.role != "middle"})


def _write_safetensors(source: RunSource, out: Path) -> str:
    model = source.plugged_model()
    model.save_pretrained(out)
    load_tokenizer(str(source.full_model_dir)).save_pretrained(out)
    return "safetensors"


def _write_peft(source: RunSource, out: Path) -> str:
    spec = source.spec()
    adapter = source.adapter()
    if source.method != "lora":
        save_file({t.name: adapter[t.name].contiguous() for t in spec.tensors}, str(out / ADAPTER_WEIGHTS))
        layers = LayersMap(method=source.method, blocks_prefix=source.bundle.manifest.base_model.blocks_prefix,
                           blocks=_blocks(source), spec=spec.to_json())
        (out / LAYERS_MAP).write_text(json.dumps(layers.to_json(), indent=2) + "\n")
        return "layers"
    lora = lora_config_for(source.method_config, source.full_model(), spec)
    lora.base_model_name_or_path = source.bundle.manifest.base_model.id
    lora.save_pretrained(str(out))
    save_file(peft_state_dict(spec, adapter), str(out / "adapter_model.safetensors"))
    return "peft"


def _sample_inputs(source: RunSource) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(str(source.full_model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(["offsite tuning exports a plugged model", "a shorter one"], padding=True,
                      return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _write_onnx(source: RunSource, out: Path) -> str:
    from coordinator.export.onnx import export_onnx, export_onnx_lora
    from coordinator.export.onnx_session import max_abs_diff, ort_session

    sample = _sample_inputs(source)
    diffs: dict[str, float] = {}
    if source.method == "lora":
        spec = source.spec()
        base = source.full_model().eval()
        modules = [t.name.removesuffix(".lora_A.weight") for t in spec.tensors if t.name.endswith(".lora_A.weight")]
        config = source.method_config
        paths = export_onnx_lora(base, modules, config.lora_r, config.lora_alpha, {source.job_id: source.adapter()},
                                 out)
        plugged = source.plugged_model()
        diffs[source.job_id] = max_abs_diff(plugged, ort_session(out / "base.onnx"), sample["input_ids"],
                                            sample["attention_mask"], adapter=paths[source.job_id])
    else:
        plugged = source.plugged_model()
        export_onnx(plugged, out / "model.onnx")
        diffs["model"] = max_abs_diff(plugged, ort_session(out / "model.onnx"), sample["input_ids"],
                                      sample["attention_mask"])
    load_tokenizer(str(source.full_model_dir)).save_pretrained(out / "tokenizer")
    (out / PARITY_FILE).write_text(json.dumps({"max_abs_diff": diffs}, indent=2) + "\n")
    return "onnx"


WRITERS = {"safetensors": _write_safetensors, "peft": _write_peft, "adapter": _write_peft, "onnx": _write_onnx}


def export_run(run_dir: Path, fmt: str, out_dir: Path, key: Ed25519PrivateKey | None = None, *,
               force: bool = False) -> ExportManifest:
    """Export a run's final global adapter in ``fmt``; signed with ``key`` (default: the run's coordinator key)."""
    if fmt not in WRITERS:
        raise InvalidSettingError(f"{{format}} must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise OutputExistsError(out_dir)
    source = load_run(run_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        written = WRITERS[fmt](source, stage)
        report = source.report_path
        manifest = ExportManifest(
            format=written, job_id=source.job_id, rounds=source.rounds, task=source.task, method=source.method,
            labels=source.labels, base_model_id=source.bundle.manifest.base_model.id,
            base_model_sha256=source.bundle.manifest.base_model.weights_sha256,
            adapter_sha256=crypto.sha256_file(source.adapter_path), bundle_sha256=source.bundle.digest,
            report_sha256=crypto.sha256_file(report) if report else None, created=utc_timestamp())
        signed = sign_export(stage, manifest, key or source.coordinator_key)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        stage.rename(out_dir)
        return signed
    finally:
        shutil.rmtree(stage, ignore_errors=True)
