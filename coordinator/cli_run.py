"""``offsite-coordinator simulate | demo | eval``: whole-pipeline runs and the evaluation report."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from coordinator.cli_common import console, fail
from coordinator.evaluation import EvalReport
from coordinator.simulate import SimulateConfig, evaluate_run, setup, simulate

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO_DATA = EXAMPLES / "wordnet-lexnames"


def print_report(report: EvalReport, path: Path) -> None:
    table = Table(title=f"offsite tuning report ({report.metric})")
    table.add_column("row")
    table.add_column(report.metric, justify="right")
    for name, value in report.rows.items():
        table.add_row(name, f"{value:.4f}")
    table.add_row("privacy_gap = plugin_tuned - emulator_tuned", f"{report.privacy_gap:+.4f}")
    table.add_row("utility_gain = plugin_tuned - full_initial", f"{report.utility_gain:+.4f}")
    console.print(table)
    console.print(report.sign_note())
    console.print(f"report: {path} (+ .md, .png)")


def run_simulation_command(config: SimulateConfig, report: Path) -> None:
    try:
        result = simulate(config, report)
    except (ValueError, FileNotFoundError) as error:
        fail(str(error))
    print_report(result, report)


def simulate_command(
    train: Annotated[Path, typer.Option(help="Training data (JSONL or CSV), partitioned across data owners.")],
    eval_file: Annotated[Path, typer.Option("--eval", help="The coordinator's held-out evaluation data.")],
    report: Annotated[Path, typer.Option(help="Where to write the report JSON (and .md, .png beside it).")],
    model: Annotated[str | None, typer.Option(help="Hugging Face id or path [default: embedded MiniLM].")] = None,
    task: Annotated[str, typer.Option(help="classification or causal-lm.")] = "classification",
    clients: Annotated[int, typer.Option(help="Simulated data owners.")] = 2,
    rounds: Annotated[int, typer.Option(help="Federated rounds.")] = 2,
    bottom: Annotated[int, typer.Option(help="Adapter blocks at the bottom.")] = 1,
    top: Annotated[int, typer.Option(help="Adapter blocks at the top.")] = 1,
    keep: Annotated[int | None, typer.Option(help="Middle blocks the emulator keeps.")] = 2,
    method: Annotated[str, typer.Option(help="layers, lora or bitfit.")] = "layers",
    partition: Annotated[str, typer.Option(help="iid or dirichlet.")] = "iid",
    seed: Annotated[int, typer.Option(help="Seed for data partitions, heads, LoRA init and training.")] = 0,
    epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    lr: Annotated[float, typer.Option(help="Local learning rate.")] = 5e-4,
    batch_size: Annotated[int, typer.Option(help="Local batch size.")] = 16,
    max_length: Annotated[int, typer.Option(help="Token cap per example.")] = 64,
    baseline: Annotated[str | None, typer.Option(help="full-ft: also fine-tune the full model centrally.")] = None,
    distill_steps: Annotated[int, typer.Option(help="Distil the emulator first (0: plain layer drop); the "
                                                    "report then compares both emulators.")] = 0,
    min_replies: Annotated[int | None, typer.Option(help="Fewer accepted deltas abort a round [default: all "
                                                         "clients].")] = None,
    workdir: Annotated[Path | None, typer.Option(help="Run directory (resumes if it exists) [default: temp].")]
    = None,
) -> None:
    """Run the whole pipeline on this machine: bundle, gRPC service, N Flower data owners, report."""
    try:
        config = SimulateConfig(model=model, task=task, train_file=train, eval_file=eval_file,
                                workdir=workdir or Path(tempfile.mkdtemp(prefix="offsite-sim-")), clients=clients,
                                rounds=rounds, bottom=bottom, top=top, keep=keep, method=method,
                                partition=partition, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size,
                                max_length=max_length, baseline=baseline, distill_steps=distill_steps,
                                min_replies=min_replies)
    except ValueError as error:
        fail(str(error))
    run_simulation_command(config, report)


def demo_command(
    workdir: Annotated[Path | None, typer.Option(help="Run directory [default: ./offsite-demo].")] = None,
    baseline: Annotated[str | None, typer.Option(help="full-ft (the default) or none.")] = "full-ft",
    distill_steps: Annotated[int, typer.Option(help="Distillation steps for the owners' emulator.")] = 40,
) -> None:
    """The embedded default, end to end: all-MiniLM-L6-v2 (1-2-1 emulator, distilled), WordNet glosses,
    2 data owners, 2 rounds, and the report with the full fine-tuning baseline."""
    if not (DEMO_DATA / "train.jsonl").is_file():
        fail(f"the demo dataset is missing under {DEMO_DATA}; run from a clone of the repository")
    work = workdir or Path("offsite-demo")
    config = SimulateConfig(model=None, task="classification", train_file=DEMO_DATA / "train.jsonl",
                            eval_file=DEMO_DATA / "eval.jsonl", workdir=work, clients=2, rounds=2,
                            bottom=1, top=1, keep=2, method="layers", epochs=1, lr=5e-4,
                            baseline=None if baseline in (None, "none") else baseline, distill_steps=distill_steps)
    run_simulation_command(config, work / "report.json")


def eval_command(
    run: Annotated[Path, typer.Option(help="A run directory written by simulate or demo.")],
    baseline: Annotated[str | None, typer.Option(help="full-ft: add the centrally fine-tuned full model.")] = None,
    report: Annotated[Path | None, typer.Option(help="Report JSON [default: RUN/eval.json].")] = None,
) -> None:
    """Evaluate a run's tuned adapter: full/emulator x initial/tuned (+ full-ft), privacy gap, utility gain."""
    saved = run / "simulate.json"
    if not saved.is_file():
        fail(f"{saved}: no such file; is {run} a simulate/demo run directory?")
    fields = json.loads(saved.read_text())
    fields.update(baseline=baseline, workdir=run, train_file=Path(fields["train_file"]),
                  eval_file=Path(fields["eval_file"]))
    config = SimulateConfig(**fields)
    out = report or run / "eval.json"
    result = evaluate_run(config, setup(config), out)
    print_report(result, out)
