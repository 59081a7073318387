"""The plug-in evaluation report: what the plug-in gains, and what a data owner (who only has the emulator) could
not get.

Rows (each a key of the JSON holding its metric value): ``full_initial``, ``emulator_initial``, ``emulator_tuned``
(the most a data owner can get), ``plugin_tuned`` (what the coordinator gets), and with the full-ft baseline
``full_tuned``. ``privacy_gap = plugin_tuned - emulator_tuned``, ``utility_gain = plugin_tuned - full_initial``.
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

ROW_ORDER = ("full_initial", "emulator_initial", "emulator_tuned", "plugin_tuned", "full_tuned")


@dataclass
class PluginReport:
    metric: str  # accuracy | perplexity
    rows: dict[str, float]
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "perplexity"

    @property
    def privacy_gap(self) -> float:
        return self.rows["plugin_tuned"] - self.rows["emulator_tuned"]

    @property
    def utility_gain(self) -> float:
        return self.rows["plugin_tuned"] - self.rows["full_initial"]

    def sign_note(self) -> str:
        if self.higher_is_better:
            return f"higher {self.metric} is better: a positive privacy_gap means the plug-in beats the emulator"
        return f"lower {self.metric} is better: a negative privacy_gap means the plug-in beats the emulator"

    def to_json(self) -> dict[str, Any]:
        ordered = {name: self.rows[name] for name in ROW_ORDER if name in self.rows}
        ordered |= {name: value for name, value in self.rows.items() if name not in ordered}
        return {"metric": self.metric, "higher_is_better": self.higher_is_better, **ordered,
                "privacy_gap": self.privacy_gap, "utility_gain": self.utility_gain, "note": self.sign_note(),
                **self.notes}

    def markdown(self) -> str:
        lines = [f"| row | {self.metric} |", "| --- | ---: |"]
        lines += [f"| {name} | {value:.4f} |" for name, value in self.to_json().items()
                  if isinstance(value, float) and name not in ("privacy_gap", "utility_gain")]
        lines += [f"| privacy_gap (plugin_tuned - emulator_tuned) | {self.privacy_gap:+.4f} |",
                  f"| utility_gain (plugin_tuned - full_initial) | {self.utility_gain:+.4f} |", "", self.sign_note()]
        return "\n".join(lines) + "\n"

    def write(self, json_path: Path) -> tuple[Path, Path, Path]:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
        md_path.write_text(self.markdown())
        names = list(self.rows)
        figure, axis = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
        bars = axis.bar(names, [self.rows[n] for n in names],
                        color=["#999999" if "initial" in n else "#3b7dd8" if "emulator" in n else "#d8703b"
                               for n in names])
        axis.bar_label(bars, fmt="%.3f")
        axis.set_ylim(top=max(self.rows.values()) * 1.15 if max(self.rows.values()) > 0 else None)
        axis.set_ylabel(self.metric)
        axis.set_title(f"offsite tuning: privacy gap {self.privacy_gap:+.3f}, utility gain {self.utility_gain:+.3f}")
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
    return "accuracy" if task == "classification" else "perplexity"


def _score(inputs: EvalInputs, model: torch.nn.Module, desc: str) -> float:
    result = evaluate(model, inputs.eval_examples, inputs.tokenizer, inputs.task, max_length=inputs.max_length,
                      desc=desc)
    return result[metric_of(inputs.task)]


def plugin_score(inputs: EvalInputs, adapter: Mapping[str, torch.Tensor], desc: str = "plug-in") -> float:
    return _score(inputs, plug(copy.deepcopy(inputs.full), inputs.spec, adapter, inputs.method), desc)


def emulator_score(inputs: EvalInputs, adapter: Mapping[str, torch.Tensor], desc: str = "emulator") -> float:
    model = make_trainable(copy.deepcopy(inputs.emulator), inputs.spec, inputs.method)
    load(model, inputs.spec, adapter)
    return _score(inputs, model, desc)


def full_finetune_score(inputs: EvalInputs, initial: Mapping[str, torch.Tensor], train_examples: Sequence[Example],
                        config: TrainConfig) -> float:
    """Reference: the full model (initial adapter plugged), every parameter fine-tuned centrally on all data."""
    model = plug(copy.deepcopy(inputs.full), inputs.spec, initial, inputs.method)
    for param in model.parameters():
        param.requires_grad_(True)
    train(model, list(train_examples), inputs.tokenizer, inputs.task, config, desc="full fine-tuning")
    return _score(inputs, model, "full_tuned")


def build_report(inputs: EvalInputs, initial: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], *,
                 full_ft: Callable[[], float] | None = None,
                 extra_rows: Mapping[str, float] | None = None) -> PluginReport:
    rows = {
        "full_initial": plugin_score(inputs, initial, "full_initial"),
        "emulator_initial": emulator_score(inputs, initial, "emulator_initial"),
        "emulator_tuned": emulator_score(inputs, tuned, "emulator_tuned"),
        "plugin_tuned": plugin_score(inputs, tuned, "plugin_tuned"),
    }
    if full_ft is not None:
        rows["full_tuned"] = full_ft()
    rows.update(extra_rows or {})
    return PluginReport(metric_of(inputs.task), rows)
