"""The plug-in evaluation report: what the plug-in gains, and what a data owner (who only has the emulator) could
not get.

Rows (each a key of the JSON holding its metric value), the five settings of the Offsite-Tuning paper:
``full_initial`` (full zero-shot), ``emulator_initial`` (emulator zero-shot), ``emulator_tuned`` (the adapter tuned on
the emulator), ``plugin_tuned`` (what the coordinator gets) and, with the full-ft baseline, ``full_tuned``; plus
``attacker_tuned``: a data owner who defects, heals the emulator with an LM loss on public text and then fine-tunes
every weight of it on the task. ``privacy_gap = plugin_tuned - emulator_tuned``,
``privacy_gap_vs_attacker = plugin_tuned - attacker_tuned`` (the honest figure), ``utility_gain = plugin_tuned -
full_initial``. Multiple-choice rows carry standard errors (``stderr``) and ``acc_norm`` (``details``); ``costs``
compares what the data owner pays on the emulator with full fine-tuning, measured in the same run.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402

from emulator.data import Example  # noqa: E402
from emulator.methods import MethodConfig, load, make_trainable, plug  # noqa: E402
from emulator.train import TrainConfig, evaluate, train  # noqa: E402
from protos.adapter_spec import AdapterSpec  # noqa: E402

ROW_ORDER = ("full_initial", "emulator_initial", "emulator_tuned", "plugin_tuned", "full_tuned", "attacker_tuned")
METRICS = {"classification": "accuracy", "multiple-choice": "acc", "causal-lm": "perplexity"}


@dataclass
class PluginReport:
    metric: str  # accuracy | acc | perplexity
    rows: dict[str, float]
    notes: dict[str, Any] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)  # per row, where the metric has one
    details: dict[str, dict[str, float]] = field(default_factory=dict)  # per row: every metric of its evaluation
    costs: dict[str, float] = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "perplexity"

    @property
    def privacy_gap(self) -> float:
        return self.rows["plugin_tuned"] - self.rows["emulator_tuned"]

    @property
    def utility_gain(self) -> float:
        return self.rows["plugin_tuned"] - self.rows["full_initial"]

    @property
    def privacy_gap_vs_attacker(self) -> float | None:
        if "attacker_tuned" not in self.rows:
            return None
        return self.rows["plugin_tuned"] - self.rows["attacker_tuned"]

    def gaps(self) -> dict[str, float]:
        gaps = {"privacy_gap": self.privacy_gap, "utility_gain": self.utility_gain}
        if (attacker := self.privacy_gap_vs_attacker) is not None:
            gaps["privacy_gap_vs_attacker"] = attacker
        return gaps

    def sign_note(self) -> str:
        if self.higher_is_better:
            return f"higher {self.metric} is better: a positive privacy_gap means the plug-in beats the emulator"
        return f"lower {self.metric} is better: a negative privacy_gap means the plug-in beats the emulator"

    def to_json(self) -> dict[str, Any]:
        ordered = {name: self.rows[name] for name in ROW_ORDER if name in self.rows}
        ordered |= {name: value for name, value in self.rows.items() if name not in ordered}
        extra: dict[str, Any] = {}
        if self.stderr:
            extra["stderr"] = self.stderr
        if self.details:
            extra["details"] = self.details
        if self.costs:
            extra["costs"] = self.costs
        return {"metric": self.metric, "higher_is_better": self.higher_is_better, **ordered, **self.gaps(),
                "note": self.sign_note(), **extra, **self.notes}

    def markdown(self) -> str:
        lines = [f"| row | {self.metric} | stderr |", "| --- | ---: | ---: |"]
        for name in [n for n in ROW_ORDER if n in self.rows] + [n for n in self.rows if n not in ROW_ORDER]:
            error = f"{self.stderr[name]:.4f}" if name in self.stderr else ""
            lines.append(f"| {name} | {self.rows[name]:.4f} | {error} |")
        labels = {"privacy_gap": "plugin_tuned - emulator_tuned", "utility_gain": "plugin_tuned - full_initial",
                  "privacy_gap_vs_attacker": "plugin_tuned - attacker_tuned"}
        lines += [f"| {name} ({labels[name]}) | {value:+.4f} | |" for name, value in self.gaps().items()]
        if self.costs:
            lines += ["", "| cost | value |", "| --- | ---: |"]
            lines += [f"| {name} | {value:,.2f} |" for name, value in self.costs.items()]
        return "\n".join(lines + ["", self.sign_note()]) + "\n"

    def write(self, json_path: Path) -> tuple[Path, Path, Path]:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
        md_path.write_text(self.markdown())
        names = list(self.rows)
        figure, axis = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
        bars = axis.bar(names, [self.rows[n] for n in names],
                        yerr=[self.stderr.get(n, 0.0) for n in names], capsize=3,
                        color=["#999999" if "initial" in n else "#3b7dd8" if "emulator" in n else
                               "#8b1e3f" if "attacker" in n else "#d8703b" for n in names])
        axis.bar_label(bars, fmt="%.3f")
        axis.set_ylim(top=max(self.rows.values()) * 1.15 if max(self.rows.values()) > 0 else None)
        axis.set_ylabel(self.metric)
        attacker = self.privacy_gap_vs_attacker
        axis.set_title(f"offsite tuning: privacy gap {self.privacy_gap:+.3f}"
                       + (f" (vs attacker {attacker:+.3f})" if attacker is not None else "")
                       + f", utility gain {self.utility_gain:+.3f}", fontsize=10)
        axis.tick_params(axis="x", rotation=20)
        figure.tight_layout()
        figure.savefig(png_path, dpi=120)
        plt.close(figure)
        return json_path, md_path, png_path


@dataclass(frozen=True)
class EvalInputs:
    full: PreTrainedModel  # the private full model, untouched (copies are plugged)
    emulator: PreTrainedModel  # the emulator data owners got (or another one, for a second emulator row)
    tokenizer: PreTrainedTokenizerBase
    task: str
    spec: AdapterSpec
    method: MethodConfig
    eval_examples: Sequence[Example]
    max_length: int = 128


def metric_of(task: str) -> str:
    return METRICS[task]


Scores = dict[str, float]  # every metric of one evaluation: {"acc": .., "acc_stderr": .., "acc_norm": ..}


def evaluate_model(inputs: EvalInputs, model: torch.nn.Module, desc: str) -> Scores:
    return evaluate(model, inputs.eval_examples, inputs.tokenizer, inputs.task, max_length=inputs.max_length,
                    desc=desc)


def plugin_score(inputs: EvalInputs, adapter: Mapping[str, torch.Tensor], desc: str = "plug-in") -> Scores:
    return evaluate_model(inputs, plug(copy.deepcopy(inputs.full), inputs.spec, adapter, inputs.method), desc)


def emulator_score(inputs: EvalInputs, adapter: Mapping[str, torch.Tensor], desc: str = "emulator") -> Scores:
    model = make_trainable(copy.deepcopy(inputs.emulator), inputs.spec, inputs.method)
    load(model, inputs.spec, adapter)
    return evaluate_model(inputs, model, desc)


def train_all(model: torch.nn.Module, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, task: str,
              config: TrainConfig, desc: str) -> dict[str, float]:
    for param in model.parameters():
        param.requires_grad_(True)
    return train(model, list(examples), tokenizer, task, config, desc=desc)


def full_finetune_score(inputs: EvalInputs, initial: Mapping[str, torch.Tensor], train_examples: Sequence[Example],
                        config: TrainConfig) -> tuple[Scores, dict[str, float]]:
    """Reference: the full model (initial adapter plugged), every parameter fine-tuned centrally on all data.
    Returns its scores and its training record (tokens/s)."""
    model = plug(copy.deepcopy(inputs.full), inputs.spec, initial, inputs.method)
    record = train_all(model, train_examples, inputs.tokenizer, inputs.task, config, "full fine-tuning")
    return evaluate_model(inputs, model, "full_tuned"), record


@dataclass(frozen=True)
class AttackerConfig:
    """The defecting data owner: heal the whole emulator on public text (LM loss; causal models only), then
    fine-tune every weight of it on the task."""

    public_docs: Sequence[str]
    heal: TrainConfig  # max_steps is the healing budget
    finetune: TrainConfig


def attacker_score(inputs: EvalInputs, initial: Mapping[str, torch.Tensor], train_examples: Sequence[Example],
                   config: AttackerConfig) -> tuple[Scores, dict[str, float]]:
    model = make_trainable(copy.deepcopy(inputs.emulator), inputs.spec, inputs.method)
    load(model, inputs.spec, initial)
    record: dict[str, float] = {}
    if inputs.task != "classification" and config.heal.max_steps and config.public_docs:
        healing = train_all(model, [Example(text=doc) for doc in config.public_docs], inputs.tokenizer, "causal-lm",
                            config.heal, "attacker: healing")
        record["heal_steps"] = healing["steps"]
    finetuned = train_all(model, train_examples, inputs.tokenizer, inputs.task, config.finetune, "attacker: tuning")
    record.update(finetuned)
    return evaluate_model(inputs, model, "attacker_tuned"), record


def build_report(inputs: EvalInputs, initial: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], *,
                 full_ft: Callable[[], tuple[Scores, dict[str, float]]] | None = None,
                 attacker: Callable[[], tuple[Scores, dict[str, float]]] | None = None,
                 extra_rows: Mapping[str, Scores] | None = None) -> PluginReport:
    metric = metric_of(inputs.task)
    scores = {
        "full_initial": plugin_score(inputs, initial, "full_initial"),
        "emulator_initial": emulator_score(inputs, initial, "emulator_initial"),
        "emulator_tuned": emulator_score(inputs, tuned, "emulator_tuned"),
        "plugin_tuned": plugin_score(inputs, tuned, "plugin_tuned"),
    }
    records: dict[str, dict[str, float]] = {}
    if full_ft is not None:
        scores["full_tuned"], records["full_tuned"] = full_ft()
    if attacker is not None:
        scores["attacker_tuned"], records["attacker_tuned"] = attacker()
    scores.update(extra_rows or {})
    report = PluginReport(metric, {name: s[metric] for name, s in scores.items()},
                          stderr={name: s[f"{metric}_stderr"] for name, s in scores.items() if f"{metric}_stderr" in s},
                          details=scores if inputs.task == "multiple-choice" else {})
    report.notes["training"] = records
    return report
