"""``simulate``'s evaluation: plug each variant's final global adapter into the full model, and the report."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from coordinator.bundles import base_model_id
from coordinator.costs import CostProbe, training_costs
from coordinator.plugin_report import (
    AttackerConfig,
    EvalInputs,
    PluginReport,
    Scores,
    attacker_score,
    build_report,
    emulator_score,
    full_finetune_score,
    plugin_score,
)
from coordinator.progress import Progress, checkpoint_path
from coordinator.simulate.config import SimulateConfig
from coordinator.simulate.setup import Setup, Variant, coordinator_public_key
from emulator.corpus import default_corpus, read_documents, split_documents
from emulator.data import load_examples
from emulator.device import pick_device
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
    device = pick_device(config.device)
    full = load_model(prepared.full_model_dir, config.task)
    torch.nn.Module.to(full, device)
    tokenizer = load_tokenizer(prepared.full_model_dir)
    eval_examples = load_examples(config.eval_file, config.task, prepared.labels)

    def inputs_for(variant: Variant) -> EvalInputs:
        emulator = load_emulator(variant.bundle)
        torch.nn.Module.to(emulator, device)
        return EvalInputs(full=full, emulator=emulator, tokenizer=tokenizer, task=config.task,
                          spec=method_spec(variant.bundle.adapter_spec, emulator, config.method_config),
                          method=config.method_config, eval_examples=eval_examples,
                          max_length=config.training.max_length)

    inputs = inputs_for(primary)
    initial, tuned, final_round = _adapters(work, primary)
    train_examples = load_examples(config.train_file, config.task, prepared.labels)
    training = config.training
    # Centralised references see all the data for as many epochs as the federation ran in total.
    ft_config = TrainConfig(epochs=training.epochs * config.rounds, lr=min(training.lr, 5e-5),
                            batch_size=training.batch_size, max_length=training.max_length, seed=training.seed)
    full_ft = attacker = None
    if config.baseline == "full-ft":
        def full_ft() -> tuple[Scores, dict[str, float]]:
            return full_finetune_score(inputs, initial, train_examples, ft_config)

    if config.attacker:
        public_train, _ = split_documents(read_documents([default_corpus()]), held_out_percent=10)
        heal = TrainConfig(epochs=1, lr=1e-4, batch_size=8, max_length=min(training.max_length, 128),
                           seed=training.seed, max_steps=config.heal_steps)
        attack = AttackerConfig(public_docs=public_train, heal=heal, finetune=ft_config)

        def attacker() -> tuple[Scores, dict[str, float]]:
            return attacker_score(inputs, initial, train_examples, attack)

    extra: dict[str, Scores] = {}
    for variant in others:
        other_inputs = inputs_for(variant)
        _, other_tuned, _ = _adapters(work, variant)
        extra[f"emulator_tuned_{variant.name}"] = emulator_score(other_inputs, other_tuned, variant.name)
        extra[f"plugin_tuned_{variant.name}"] = plugin_score(other_inputs, other_tuned, f"plug-in {variant.name}")
    report = build_report(inputs, initial, tuned, full_ft=full_ft, attacker=attacker, extra_rows=extra)
    if config.cost_steps:
        checkpoint = checkpoint_path(primary.checkpoints(work), 0)
        probe = CostProbe(side="emulator", bundle_dir=primary.bundle.root, coordinator_pub=coordinator_public_key(work),
                          full_model_dir=Path(prepared.full_model_dir), train_file=config.train_file,
                          task=config.task, labels=prepared.labels, method=config.method_config,
                          training=config.train_config, adapter_file=checkpoint)
        report.costs = training_costs(probe, config.cost_steps, inputs.spec)
    report.notes.update({
        "emulator": primary.name, "rounds_completed": final_round,
        "rounds": [{k: v for k, v in r.to_json().items() if k != "owner_metrics"}
                   for r in Progress.load(primary.checkpoints(work)).rounds],
        "method": config.training.method, "clients": config.clients, "model": base_model_id(config.model),
        "split": config.split_name, "task": config.task,
    })
    report.write(report_path)
    return report
