"""``simulate``'s evaluation: plug each variant's final global adapter into the full model, and the report."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from coordinator.bundles import base_model_id
from coordinator.plugin_report import (
    EvalInputs,
    PluginReport,
    build_report,
    emulator_score,
    full_finetune_score,
    plugin_score,
)
from coordinator.progress import Progress, checkpoint_path
from coordinator.simulate.config import SimulateConfig
from coordinator.simulate.setup import Setup, Variant
from emulator.data import load_examples
from emulator.loading import load_model, load_tokenizer
from emulator.methods import method_spec
from emulator.quantize import load_emulator
from emulator.train import TrainConfig


def _adapters(work: Path, variant: Variant) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """The variant's initial and final global adapters, and the final round's number."""
    checkpoints = variant.checkpoints(work)
    final_round = Progress.load(checkpoints).completed_round
    return (load_file(str(checkpoint_path(checkpoints, 0))), load_file(str(checkpoint_path(checkpoints, final_round))),
            final_round)


def evaluate_run(config: SimulateConfig, prepared: Setup, report_path: Path) -> PluginReport:
    """Plug the final global adapter into the full model and write the plug-in report (JSON, MD, PNG)."""
    work = config.workdir
    primary, others = prepared.variants[0], prepared.variants[1:]
    full = load_model(prepared.full_model_dir, config.task)
    tokenizer = load_tokenizer(prepared.full_model_dir)
    eval_examples = load_examples(config.eval_file, config.task, prepared.labels)

    def inputs_for(variant: Variant) -> EvalInputs:
        emulator = load_emulator(variant.bundle)
        return EvalInputs(full=full, emulator=emulator, tokenizer=tokenizer, task=config.task,
                          spec=method_spec(variant.bundle.adapter_spec, emulator, config.method_config),
                          method=config.method_config, eval_examples=eval_examples,
                          max_length=config.training.max_length)

    inputs = inputs_for(primary)
    initial, tuned, final_round = _adapters(work, primary)
    full_ft = None
    if config.baseline == "full-ft":
        train_examples = load_examples(config.train_file, config.task, prepared.labels)
        training = config.training
        ft_config = TrainConfig(epochs=training.epochs * config.rounds, lr=min(training.lr, 5e-5),
                                batch_size=training.batch_size, max_length=training.max_length, seed=training.seed)

        def full_ft() -> float:
            return full_finetune_score(inputs, initial, train_examples, ft_config)

    extra: dict[str, float] = {}
    for variant in others:
        other_inputs = inputs_for(variant)
        _, other_tuned, _ = _adapters(work, variant)
        extra[f"emulator_tuned_{variant.name}"] = emulator_score(other_inputs, other_tuned, variant.name)
        extra[f"plugin_tuned_{variant.name}"] = plugin_score(other_inputs, other_tuned, f"plug-in {variant.name}")
    report = build_report(inputs, initial, tuned, full_ft=full_ft, extra_rows=extra)
    report.notes.update({
        "emulator": primary.name, "rounds_completed": final_round,
        "rounds": [{k: v for k, v in r.to_json().items() if k != "owner_metrics"}
                   for r in Progress.load(primary.checkpoints(work)).rounds],
        "method": config.training.method, "clients": config.clients, "model": base_model_id(config.model),
        "split": f"{config.bottom}-{config.keep}-{config.top}", "task": config.task,
    })
    report.write(report_path)
    return report
