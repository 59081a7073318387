"""The privacy-utility frontier: several (adapter placement, compressor) settings of one model on one task.

Per setting, centrally and on one machine (a federation of honest owners reaches the same adapter, slower): cut the
emulator with the setting's compression plan, tune the adapter on it (what an honest owner gets:
``emulator_tuned``), plug it into the full model (``plugin_tuned``), and play the defecting owner who heals the
whole emulator on public text and then tunes every weight of it (``attacker_tuned``). Full zero-shot and full
fine-tuning are computed once. Each setting's result is saved as it finishes (``settings/NAME.json``): a rerun
resumes. ``sweep.json`` and ``sweep.png`` (plug-in against attacker and emulator-tuned scores) hold the frontier.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coordinator.errors import InvalidSettingError  # noqa: E402
from coordinator.plugin_report import (  # noqa: E402
    AttackerConfig,
    EvalInputs,
    Scores,
    attacker_score,
    evaluate_model,
    full_finetune_score,
    metric_of,
    plugin_score,
)
from emulator.compress import CompressionPlan, compress  # noqa: E402
from emulator.corpus import default_corpus, read_documents, split_documents  # noqa: E402
from emulator.data import Example, labels_of, load_examples  # noqa: E402
from emulator.errors import EmulatorError  # noqa: E402
from emulator.families import locate_blocks  # noqa: E402
from emulator.loading import load_model, load_tokenizer, resolve_model  # noqa: E402
from emulator.methods import MethodConfig, extract, make_trainable, method_spec  # noqa: E402
from emulator.split import SplitConfig  # noqa: E402
from emulator.surgery import adapter_spec, extract_adapter  # noqa: E402
from emulator.train import TrainConfig, train  # noqa: E402
from protos.documents import Document, DocumentError  # noqa: E402
from protos.files import atomic_write  # noqa: E402

PRIVACY_MARGIN = 0.03  # the plug-in should beat the attacker by at least 3 points
UTILITY_MARGIN = 0.02  # and come within 2 points of full fine-tuning


@dataclass(frozen=True, kw_only=True)
class SweepSetting(Document):
    name: str
    bottom: int = 2
    top: int = 2
    adapter_blocks: list[int] | None = None  # explicit placement (CRaSh spreads it); bottom/top then unused
    compression: list[dict[str, Any]]  # an emulator.compress.CompressionPlan as JSON

    def split(self) -> SplitConfig:
        if self.adapter_blocks is not None:
            return SplitConfig(adapter_blocks=tuple(self.adapter_blocks))
        return SplitConfig(bottom=self.bottom, top=self.top)

    def plan(self) -> CompressionPlan:
        return CompressionPlan.from_json(self.compression)


@dataclass(frozen=True, kw_only=True)
class SweepConfig(Document):
    settings: list[SweepSetting]
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 8
    max_length: int = 64
    seed: int = 0
    heal_steps: int = 50  # the attacker's healing budget on public text
    full_ft: bool = True  # also fine-tune the full model (the utility target)
    train_limit: int | None = None  # use the first N training items (a quicker sweep)
    eval_limit: int | None = None

    def __post_init__(self) -> None:
        names = [s.name for s in self.settings]
        if not names or len(set(names)) != len(names):
            raise InvalidSettingError("{configs} needs settings with distinct names")

    def training(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, max_length=self.max_length,
                           seed=self.seed)

    @classmethod
    def load(cls, path: Path) -> SweepConfig:
        try:
            config = cls.from_json(json.loads(Path(path).read_text()), str(path))
            for setting in config.settings:
                setting.split()
                setting.plan()
        except (OSError, ValueError, DocumentError, EmulatorError) as error:
            raise InvalidSettingError(f"{{configs}} {path}: {error}") from error
        return config


@dataclass
class SettingResult(Document):
    name: str
    compression: str  # the plan, described
    adapter_blocks: list[int]
    emulator_blocks: int
    distinct_emulator_blocks: int
    scores: dict[str, dict[str, float]]  # row -> every metric of that evaluation
    metric: str

    def value(self, row: str) -> float:
        return self.scores[row][self.metric]


@dataclass
class SweepResult(Document):
    metric: str
    baseline: dict[str, dict[str, float]]  # full_initial, full_tuned
    settings: list[SettingResult] = field(default_factory=list)
    best: str | None = None
    best_reason: str = ""


def _examples(path: Path, task: str, labels: list[str] | None, limit: int | None) -> list[Example]:
    examples = load_examples(path, task, labels)
    return examples[:limit] if limit else examples


def _run_setting(setting: SweepSetting, full: Any, tokenizer: Any, task: str, train_examples: list[Example],
                 eval_examples: list[Example], config: SweepConfig, public: list[str]) -> SettingResult:
    emulator = compress(full, setting.split(), setting.plan(), tokenizer=tokenizer)
    method = MethodConfig("layers")
    spec = method_spec(adapter_spec(full, emulator.location, emulator.plan), emulator.model, method)
    inputs = EvalInputs(full=full, emulator=emulator.model, tokenizer=tokenizer, task=task, spec=spec, method=method,
                        eval_examples=eval_examples, max_length=config.max_length)
    owner = make_trainable(copy.deepcopy(emulator.model), spec, method)
    initial = extract(owner, spec)
    scores: dict[str, Scores] = {"emulator_initial": evaluate_model(inputs, owner, f"{setting.name}: emulator")}
    train(owner, train_examples, tokenizer, task, config.training(), desc=f"{setting.name}: owner tuning")
    tuned = extract(owner, spec)
    scores["emulator_tuned"] = evaluate_model(inputs, owner, f"{setting.name}: emulator tuned")
    scores["plugin_tuned"] = plugin_score(inputs, tuned, f"{setting.name}: plug-in")
    heal = TrainConfig(epochs=1, lr=config.lr, batch_size=config.batch_size, max_length=config.max_length,
                       seed=config.seed, max_steps=config.heal_steps)
    scores["attacker_tuned"], _ = attacker_score(inputs, initial, train_examples,
                                                 AttackerConfig(public_docs=public, heal=heal,
                                                                finetune=config.training()))
    sources = [e.full_index for e in emulator.plan.entries]
    return SettingResult(name=setting.name, compression=setting.plan().describe(),
                         adapter_blocks=list(emulator.plan.adapter_blocks), emulator_blocks=len(sources),
                         distinct_emulator_blocks=len(set(sources)), scores=scores, metric=metric_of(task))


def choose_best(result: SweepResult) -> tuple[str | None, str]:
    """The best plug-in among settings that beat the attacker by PRIVACY_MARGIN; else the widest attacker gap."""
    if not result.settings:
        return None, ""
    gap = {s.name: s.value("plugin_tuned") - s.value("attacker_tuned") for s in result.settings}
    private = [s for s in result.settings if gap[s.name] >= PRIVACY_MARGIN]
    if private:
        best = max(private, key=lambda s: s.value("plugin_tuned"))
        return best.name, f"highest plug-in among settings beating the attacker by >= {PRIVACY_MARGIN:.2f}"
    best = max(result.settings, key=lambda s: gap[s.name])
    return best.name, f"no setting beats the attacker by {PRIVACY_MARGIN:.2f}: the widest attacker gap"


def plot_frontier(result: SweepResult, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(7, 5))
    for setting in result.settings:
        plugin = setting.value("plugin_tuned")
        attacker, honest = setting.value("attacker_tuned"), setting.value("emulator_tuned")
        axis.plot([honest, attacker], [plugin, plugin], color="#bbbbbb", zorder=1)
        axis.scatter([attacker], [plugin], color="#8b1e3f", zorder=2)
        axis.scatter([honest], [plugin], facecolors="none", edgecolors="#3b7dd8", zorder=2)
        axis.annotate(setting.name + (" (best)" if setting.name == result.best else ""), (attacker, plugin),
                      textcoords="offset points", xytext=(4, 4), fontsize=8)
    low, high = axis.get_xlim()
    axis.plot([low, high], [low, high], ls=":", color="#999999", label="plug-in = owner's score")
    axis.plot([low, high], [low + PRIVACY_MARGIN, high + PRIVACY_MARGIN], ls="--", color="#999999",
              label=f"privacy goal: plug-in >= attacker + {PRIVACY_MARGIN:.2f}")
    for row, style in (("full_initial", ":"), ("full_tuned", "-.")):
        if row in result.baseline:
            axis.axhline(result.baseline[row][result.metric], ls=style, color="#d8703b", label=row)
    axis.scatter([], [], color="#8b1e3f", label="vs attacker (heals + tunes all)")
    axis.scatter([], [], facecolors="none", edgecolors="#3b7dd8", label="vs honest owner (adapter only)")
    axis.set_xlabel(f"data owner's {result.metric} on the emulator")
    axis.set_ylabel(f"plug-in {result.metric}")
    axis.set_title("privacy-utility frontier: higher and further left is better")
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run_sweep(model: str | None, task: str, train_file: Path, eval_file: Path, config: SweepConfig, out: Path,
              *, on_setting: Callable[[SettingResult], None] | None = None) -> SweepResult:
    """Every setting of ``config`` (resuming the ones already saved in ``out/settings``), then the frontier."""
    (out / "settings").mkdir(parents=True, exist_ok=True)
    atomic_write(out / "configs.json", json.dumps(config.to_json(), indent=2) + "\n")
    source = resolve_model(model)
    labels = labels_of(train_file) if task == "classification" else None
    full, tokenizer = load_model(source, task, num_labels=len(labels) if labels else None), load_tokenizer(source)
    train_examples = _examples(train_file, task, labels, config.train_limit)
    eval_examples = _examples(eval_file, task, labels, config.eval_limit)
    public, _ = split_documents(read_documents([default_corpus()]), held_out_percent=10)
    baseline_path = out / "baseline.json"
    if baseline_path.is_file():
        baseline: dict[str, dict[str, float]] = json.loads(baseline_path.read_text())
    else:
        location = locate_blocks(full)  # any split's spec will do: its adapter is plugged back unchanged
        spec = adapter_spec(full, location, SplitConfig(bottom=1, top=1).plan(location.n_layers))
        inputs = EvalInputs(full=full, emulator=full, tokenizer=tokenizer, task=task, spec=spec,
                            method=MethodConfig("layers"), eval_examples=eval_examples,
                            max_length=config.max_length)
        baseline = {"full_initial": evaluate_model(inputs, full, "full zero-shot")}
        if config.full_ft:
            initial = extract_adapter(full, spec, from_emulator=False)
            baseline["full_tuned"], _ = full_finetune_score(inputs, initial, train_examples,
                                                            replace(config.training(), lr=min(config.lr, 5e-5)))
        atomic_write(baseline_path, json.dumps(baseline, indent=2) + "\n")
    result = SweepResult(metric=metric_of(task), baseline=baseline)
    for setting in config.settings:
        saved = out / "settings" / f"{setting.name}.json"
        if saved.is_file():
            done = SettingResult.from_json(json.loads(saved.read_text()), str(saved))
        else:
            done = _run_setting(setting, full, tokenizer, task, train_examples, eval_examples, config, public)
            atomic_write(saved, json.dumps(done.to_json(), indent=2) + "\n")
        result.settings.append(done)
        if on_setting is not None:
            on_setting(done)
    result.best, result.best_reason = choose_best(result)
    atomic_write(out / "sweep.json", json.dumps(result.to_json(), indent=2) + "\n")
    plot_frontier(result, out / "sweep.png")
    return result
