"""What a data owner pays: tuning the adapter on the emulator against fine-tuning the full model, measured in one run.

Each side trains ``steps`` optimizer steps with the same batches and settings in its own spawned process, so its peak
RSS is its own: the process notes its RSS after imports (the baseline) and resets the kernel's high-water mark (a
spawned child inherits its parent's), loads its model (the emulator from the verified bundle; the full model from
the coordinator's directory), trains, and reports tokens/s and the peak RSS above the baseline (``VmHWM``). Sizes
count parameter bytes as they are held for training.
"""

from __future__ import annotations

import math
import multiprocessing
import resource
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from emulator.data import load_examples
from emulator.methods import MethodConfig, load, make_trainable, method_spec, plug
from emulator.train import TrainConfig, train
from protos.adapter_spec import AdapterSpec
from protos.tensors import ITEM_SIZES

MB = 1 << 20


@dataclass(frozen=True)
class CostProbe:
    """Everything one measuring process needs, as plain picklable values."""

    side: str  # "emulator" | "full"
    bundle_dir: Path
    coordinator_pub: Path
    full_model_dir: Path
    train_file: Path
    task: str
    labels: list[str] | None
    method: MethodConfig
    training: TrainConfig
    adapter_file: Path  # the initial global adapter (safetensors)


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / MB


def _reset_peak() -> None:
    """Reset the RSS high-water mark: a spawned child starts with its parent's (it survives fork and exec)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    """VmHWM (the high-water mark since the last reset), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(probe: CostProbe, results: Any) -> None:
    from safetensors.torch import load_file

    from emulator.loading import load_model, load_tokenizer
    from emulator.quantize import load_emulator
    from protos import crypto
    from protos.bundle import verify_bundle_dir

    baseline = _rss_mb()
    _reset_peak()
    bundle = verify_bundle_dir(probe.bundle_dir, crypto.load_public_key(probe.coordinator_pub))
    emulator = load_emulator(bundle)
    spec: AdapterSpec = method_spec(bundle.adapter_spec, emulator, probe.method)
    adapter = load_file(str(probe.adapter_file))
    examples = load_examples(probe.train_file, probe.task, probe.labels)
    if probe.side == "emulator":
        model = make_trainable(emulator, spec, probe.method)
        load(model, spec, adapter)
    else:
        del emulator
        model = plug(load_model(str(probe.full_model_dir), probe.task), spec, adapter, probe.method)
        for param in model.parameters():
            param.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    record = train(model, examples, load_tokenizer(str(probe.full_model_dir)), probe.task, probe.training,
                   desc=f"cost: {probe.side}", show_progress=False)
    peak = _peak_mb()
    results.put({"tokens_per_s": record["tokens_per_s"], "peak_rss_mb": peak - baseline,
                 "trainable_parameters": float(trainable), "model_mb": size / MB})


def measure_side(probe: CostProbe) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_measure, args=(probe, results))
    process.start()
    try:
        measured: dict[str, float] = results.get(timeout=1800)
    finally:
        process.join(timeout=60)
    return measured


def training_costs(probe: CostProbe, steps: int, spec: AdapterSpec) -> dict[str, float]:
    """Cost rows: trainable parameters, sizes, tokens/s and peak RSS of emulator tuning vs full fine-tuning."""
    training = replace(probe.training, max_steps=steps)
    emulator = measure_side(replace(probe, side="emulator", training=training))
    full = measure_side(replace(probe, side="full", training=training))
    return {
        "trainable_parameters_emulator": emulator["trainable_parameters"],
        "trainable_parameters_full": full["trainable_parameters"],
        "adapter_mb": sum(math.prod(t.shape) * ITEM_SIZES[t.dtype] for t in spec.tensors) / MB,
        "emulator_mb": emulator["model_mb"], "full_mb": full["model_mb"],
        "emulator_tokens_per_s": emulator["tokens_per_s"], "full_tokens_per_s": full["tokens_per_s"],
        "throughput_ratio": emulator["tokens_per_s"] / max(full["tokens_per_s"], 1e-9),
        "emulator_peak_rss_mb": emulator["peak_rss_mb"], "full_peak_rss_mb": full["peak_rss_mb"],
        "memory_ratio": full["peak_rss_mb"] / max(emulator["peak_rss_mb"], 1e-9),
    }
