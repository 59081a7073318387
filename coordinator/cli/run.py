"""``offsite-coordinator simulate | demo | eval``: whole-pipeline runs and the plug-in report."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from coordinator.cli.common import VerboseOption, block_list, console, fail_with
from coordinator.demo_data import demo_dataset
from coordinator.errors import CoordinatorError, InvalidSettingError
from coordinator.plugin_report import PluginReport
from coordinator.quiet import quiet_libraries
from coordinator.simulate import SimulateConfig, evaluate_run, setup, simulate
from coordinator.simulate.llm_demo import LLM_DEMO_TASK, llm_demo_config
from emulator.compress import compression_plan
from emulator.errors import EmulatorError
from protos.errors import ProtocolError
from protos.round_config import RoundConfig

EXPECTED = (CoordinatorError, EmulatorError, ProtocolError, FileNotFoundError, FileExistsError)
SIM, ROUND = SimulateConfig, RoundConfig  # the one place defaults live: the dataclasses' own
DEMO_DISTILL_STEPS = 40


def _default(cls: type, name: str) -> object:
    return cls.__dataclass_fields__[name].default  # type: ignore[attr-defined]


def print_report(report: PluginReport, path: Path) -> None:
    table = Table(title=f"offsite tuning report ({report.metric})")
    table.add_column("row")
    table.add_column(report.metric, justify="right")
    table.add_column("stderr", justify="right")
    for name, value in report.rows.items():
        table.add_row(name, f"{value:.4f}", f"{report.stderr[name]:.4f}" if name in report.stderr else "")
    table.add_row("privacy_gap = plugin_tuned - emulator_tuned", f"{report.privacy_gap:+.4f}", "")
    if (attacker := report.privacy_gap_vs_attacker) is not None:
        table.add_row("privacy_gap_vs_attacker = plugin_tuned - attacker_tuned", f"{attacker:+.4f}", "")
    table.add_row("utility_gain = plugin_tuned - full_initial", f"{report.utility_gain:+.4f}", "")
    console.print(table)
    if report.costs:
        costs = Table(title="data owner's cost: emulator tuning vs full fine-tuning (same run)")
        costs.add_column("cost")
        costs.add_column("value", justify="right")
        for name, value in report.costs.items():
            costs.add_row(name, f"{value:,.2f}")
        console.print(costs)
    console.print(report.sign_note())
    console.print(f"report: {path} (+ .md, .png)")


def run_and_report(config: SimulateConfig, report: Path, verbose: bool) -> None:
    quiet_libraries(verbose)
    try:
        result = simulate(config, report, verbose=verbose)
    except EXPECTED as error:
        fail_with(error)
    print_report(result, report)


def simulate_command(
    train: Annotated[Path, typer.Option(help="Training data (JSONL or CSV), partitioned across data owners.")],
    eval_file: Annotated[Path, typer.Option("--eval", help="The coordinator's held-out evaluation data.")],
    report: Annotated[Path, typer.Option(help="Where to write the report JSON (and .md, .png beside it).")],
    model: Annotated[str | None, typer.Option(help="Hugging Face id, path, or smollm2 (default: the embedded "
                                                   "all-MiniLM-L6-v2).")] = None,
    task: Annotated[str, typer.Option(help="classification, causal-lm or multiple-choice.")] = _default(SIM, "task"),  # type: ignore[assignment]
    clients: Annotated[int, typer.Option(help="Simulated data owners.")] = _default(SIM, "clients"),  # type: ignore[assignment]
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = _default(SIM, "rounds"),  # type: ignore[assignment]
    bottom: Annotated[int, typer.Option(help="Adapter blocks at the bottom.")] = _default(SIM, "bottom"),  # type: ignore[assignment]
    top: Annotated[int, typer.Option(help="Adapter blocks at the top.")] = _default(SIM, "top"),  # type: ignore[assignment]
    keep: Annotated[int | None, typer.Option(help="Middle blocks the emulator keeps.")] = _default(SIM, "keep"),  # type: ignore[assignment]
    compressor: Annotated[list[str] | None, typer.Option(help="Emulator compressors in order: layer_drop, share, "
                                                              "rank (repeat or comma list).")] = None,
    clusters: Annotated[int | None, typer.Option(help="share: distinct middle blocks kept.")] = None,
    rank_fraction: Annotated[float | None, typer.Option(help="rank: singular values kept, as a fraction.")] = None,
    adapter_blocks: Annotated[str | None, typer.Option(help="Explicit adapter blocks, e.g. 0,9,20,29 (bottom/top "
                                                            "then unused).")] = None,
    method: Annotated[str, typer.Option(help="layers, lora or bitfit.")] = ROUND.method,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = ROUND.lora_r,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = ROUND.lora_alpha,
    partition: Annotated[str, typer.Option(help="iid or dirichlet.")] = _default(SIM, "partition"),  # type: ignore[assignment]
    seed: Annotated[int, typer.Option(help="Seed for data partitions, heads, LoRA init and training.")] = ROUND.seed,
    epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = ROUND.epochs,
    lr: Annotated[float, typer.Option(help="Local learning rate.")] = ROUND.lr,
    batch_size: Annotated[int, typer.Option(help="Local batch size.")] = ROUND.batch_size,
    max_length: Annotated[int, typer.Option(help="Token cap per example.")] = ROUND.max_length,
    baseline: Annotated[str | None, typer.Option(help="full-ft: also fine-tune the full model centrally.")] = None,
    attacker: Annotated[bool, typer.Option(help="Add the defecting owner's row: heal the emulator on public text, "
                                                "then fine-tune all of it.")] = False,
    heal_steps: Annotated[int, typer.Option(help="Attacker's healing steps.")] = _default(SIM, "heal_steps"),  # type: ignore[assignment]
    cost_steps: Annotated[int, typer.Option(help="Timed steps per cost row.")] = _default(SIM, "cost_steps"),  # type: ignore[assignment]
    distill_steps: Annotated[int, typer.Option(help="Distil the emulator first (0: plain layer drop); the "
                                                    "report then compares both emulators.")] = 0,
    min_replies: Annotated[int | None, typer.Option(help="Fewer accepted deltas abort a round (default: all "
                                                         "clients).")] = None,
    min_privacy_gap: Annotated[float | None, typer.Option(help="Release gate: the smallest privacy gap for listing "
                                                               "the adapter in the marketplace.")] = None,
    min_plugin_score: Annotated[float | None, typer.Option(help="Release gate: the lowest plug-in score for "
                                                                "listing.")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Run directory; resumes if it exists (default: a new "
                                                      "temporary directory).")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Run the whole pipeline on this machine: bundle, gRPC service, N Flower data owners, report."""
    try:
        training = RoundConfig(method=method, lora_r=lora_r, lora_alpha=lora_alpha, epochs=epochs, lr=lr,
                               batch_size=batch_size, max_length=max_length, seed=seed)
        plan = None
        if compressor or clusters is not None or rank_fraction is not None:
            plan = compression_plan(compressor or [], keep=keep, clusters=clusters, rank_fraction=rank_fraction)
        config = SimulateConfig(model=model, task=task, train_file=train, eval_file=eval_file,
                                workdir=workdir or Path(tempfile.mkdtemp(prefix="offsite-sim-")), clients=clients,
                                rounds=rounds, bottom=bottom, top=top, keep=None if plan else keep, training=training,
                                adapter_blocks=list(blocks) if (blocks := block_list(adapter_blocks)) else None,
                                compression=plan.to_json() if plan else None,
                                partition=partition, baseline=baseline, distill_steps=distill_steps,
                                min_replies=min_replies, attacker=attacker, heal_steps=heal_steps,
                                cost_steps=cost_steps, min_privacy_gap=min_privacy_gap,
                                min_plugin_score=min_plugin_score)
    except EXPECTED as error:
        fail_with(error, {"compressor": "--compressor", "adapter_blocks": "--adapter-blocks"})
    run_and_report(config, report, verbose)


def demo_command(
    workdir: Annotated[Path | None, typer.Option(help="Run directory; resumes if it exists (default: "
                                                      "./offsite-demo, or ./offsite-demo-smollm2).")] = None,
    model: Annotated[str | None, typer.Option(help="smollm2: the LLM demo (needs the llm extra; about 12 "
                                                   "minutes on 2 cores). Default: the embedded MiniLM.")] = None,
    task: Annotated[str, typer.Option(help="The LLM demo's shipped multiple-choice task: wordnet-definitions or "
                                           "wordnet-hypernyms.")] = LLM_DEMO_TASK,
    baseline: Annotated[str, typer.Option(help="full-ft, or none to skip the full fine-tuning row.")] = "full-ft",
    distill_steps: Annotated[int, typer.Option(help="Distillation steps for the owners' emulator.")]
    = DEMO_DISTILL_STEPS,
    verbose: VerboseOption = False,
) -> None:
    """The embedded default, end to end: all-MiniLM-L6-v2 (1-2-1 emulator, distilled), WordNet glosses,
    2 data owners, 2 rounds, and the report with the full fine-tuning baseline. With --model smollm2: the real LLM
    on a shipped multiple-choice task, with the attacker row and the cost rows."""
    try:
        if model not in (None, "smollm2"):
            raise InvalidSettingError(f"{{model}} the demo runs the embedded MiniLM or smollm2, not {model!r}; "
                                      "use simulate for other models")
        if model == "smollm2":
            workdir = workdir or Path("offsite-demo-smollm2")
            config = llm_demo_config(workdir, task=task, baseline=None if baseline == "none" else baseline)
        else:
            workdir = workdir or Path("offsite-demo")
            data = demo_dataset()
            # Everything else is simulate's own default.
            config = SimulateConfig(train_file=data / "train.jsonl", eval_file=data / "eval.jsonl",
                                    workdir=workdir, baseline=None if baseline == "none" else baseline,
                                    distill_steps=distill_steps)
    except EXPECTED as error:
        fail_with(error, {"model": "--model"})
    run_and_report(config, workdir / "report.json", verbose)


def eval_command(
    run: Annotated[Path, typer.Option(help="A run directory written by simulate or demo.")],
    baseline: Annotated[str | None, typer.Option(help="full-ft: add the centrally fine-tuned full model.")] = None,
    report: Annotated[Path | None, typer.Option(help="Report JSON (default: RUN/eval.json).")] = None,
    verbose: VerboseOption = False,
) -> None:
    """Evaluate a run's tuned adapter: full/emulator x initial/tuned (+ full-ft), privacy gap, utility gain."""
    quiet_libraries(verbose)
    out = report or run / "eval.json"
    try:
        saved = SimulateConfig.load(run)
        config = SimulateConfig(**{**{name: getattr(saved, name) for name in SimulateConfig.__dataclass_fields__},
                                   "baseline": baseline, "workdir": run})
        result = evaluate_run(config, setup(config), out)
    except EXPECTED as error:
        fail_with(error)
    print_report(result, out)
