"""``offsite-coordinator emulator ...``: build and inspect emulator bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from coordinator.bundles import build_bundle_from_model
from coordinator.cli.common import KeyOption, block_list, console, fail_with, print_summary
from coordinator.distill import distill_bundle
from coordinator.errors import CoordinatorError
from coordinator.fidelity_report import fidelity_report, plot_curve, read_curve
from coordinator.paths import load_or_create_signing_key
from emulator.compress import compression_plan
from emulator.distill import DistillConfig
from emulator.errors import EmulatorError
from emulator.split import SplitConfig
from protos import crypto
from protos.bundle import pack_bundle, verify_bundle
from protos.errors import ProtocolError

# What a command can fail with, short of a bug: each is mapped to the shared exit codes.
EXPECTED = (EmulatorError, ProtocolError, CoordinatorError, FileExistsError, FileNotFoundError)

emulator_app = typer.Typer(help="Build and inspect emulator bundles.", no_args_is_help=True)


@emulator_app.command("build")
def emulator_build(
    out: Annotated[Path, typer.Option(help="Output bundle directory.")],
    model: Annotated[str | None, typer.Option(help="Hugging Face id or local path (default: the embedded "
                                                   "all-MiniLM-L6-v2).")] = None,
    bottom: Annotated[int, typer.Option(help="Adapter blocks at the bottom.")] = 2,
    top: Annotated[int, typer.Option(help="Adapter blocks at the top.")] = 2,
    keep: Annotated[int | None, typer.Option(help="Middle blocks the emulator keeps (default: all).")] = None,
    key: KeyOption = None,
    task: Annotated[str, typer.Option(help="auto, base, causal-lm or classification.")] = "auto",
    tar: Annotated[bool, typer.Option(help="Also write OUT.tar.")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing bundle at OUT.")] = False,
    quantize: Annotated[str, typer.Option(help="none, or int8: weight-only int8 frozen middle blocks.")] = "none",
    compressor: Annotated[list[str] | None, typer.Option(
        help="Middle compressors, in order, repeatable or a comma list: layer_drop (uses --keep), share (CRaSh "
             "layer sharing, uses --clusters), rank (truncated SVD of attention, uses --rank-fraction). "
             "Default: layer_drop.")] = None,
    clusters: Annotated[int | None, typer.Option(help="share: distinct middle blocks kept.")] = None,
    rank_fraction: Annotated[float | None, typer.Option(help="rank: kept singular values, a fraction in (0, 1].")]
    = None,
    adapter_blocks: Annotated[str | None, typer.Option(
        help="Explicit adapter blocks, full-model indices, e.g. 0,5,18,23 (replaces --bottom / --top).")] = None,
) -> None:
    """Split a model into adapter + emulator (uniform layer drop by default) and write a signed bundle."""
    try:
        plan = compression_plan(compressor or [], keep=keep, clusters=clusters, rank_fraction=rank_fraction)
        split = SplitConfig(bottom=bottom, top=top, adapter_blocks=block_list(adapter_blocks))
        signing_key, key_path = load_or_create_signing_key(key)
        with console.status("building the emulator bundle"):
            summary = build_bundle_from_model(model, split, out, signing_key, task=task, force=force,
                                              quantize=quantize, compression=plan)
    except EXPECTED as error:
        fail_with(error)
    print_summary(summary)
    console.print(f"signed with {key_path} (key id {crypto.key_id(signing_key.public_key())})")
    if tar:
        console.print(f"archive {pack_bundle(out, out.with_name(out.name + '.tar'))}")


@emulator_app.command("distill")
def emulator_distill(
    bundle: Annotated[Path, typer.Argument(help="The bundle (directory or .tar) whose emulator to distil.")],
    out: Annotated[Path, typer.Option(help="Output bundle directory (checkpoints go to OUT.work).")],
    corpus: Annotated[list[Path] | None, typer.Option(help="Public .txt / .jsonl text, repeatable (default: the "
                                                           "shipped Python docstrings corpus).")] = None,
    model: Annotated[str | None, typer.Option(help="The full model (default: the manifest's base_model.id).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = DistillConfig.steps,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (cosine decay).")] = DistillConfig.lr,
    batch_size: Annotated[int, typer.Option(help="Documents per step.")] = DistillConfig.batch_size,
    seq_len: Annotated[int, typer.Option(help="Tokens per document (truncated).")] = DistillConfig.seq_len,
    eval_every: Annotated[int, typer.Option(help="Held-out evaluation and checkpoint every N steps.")]
    = DistillConfig.eval_every,
    kd_weight: Annotated[float, typer.Option(help="Weight of the normalised-MSE loss.")] = DistillConfig.kd_weight,
    lm_weight: Annotated[float, typer.Option(help="Weight of the LM loss (causal models).")] = DistillConfig.lm_weight,
    per_block: Annotated[bool, typer.Option(help="Also match every kept block's output.")] = False,
    quantize: Annotated[str, typer.Option(help="none, or int8 for the distilled middle blocks.")] = "none",
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in OUT.work.")] = False,
    key: KeyOption = None,
    force: Annotated[bool, typer.Option(help="Replace an existing bundle at OUT.")] = False,
) -> None:
    """Distil the emulator's kept middle blocks toward the full model on public text; write a new signed bundle."""
    try:
        config = DistillConfig(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, eval_every=eval_every,
                               kd_weight=kd_weight, lm_weight=lm_weight, per_block=per_block)
        signing_key, _ = load_or_create_signing_key(key)
        result = distill_bundle(bundle, None, corpus, out, config, signing_key, model=model,
                                quantize_method=quantize, resume=resume, force=force)
    except EXPECTED as error:
        fail_with(error)
    start, best = result.held_out_start["normalized_error"], result.held_out["normalized_error"]
    console.print(f"held-out normalised error at the middle's output: layer drop {start:.4f} -> distilled "
                  f"{best:.4f} (best step {result.best_step}, {result.seconds:.0f} s)\nbundle {out}")


@emulator_app.command("report")
def emulator_report(
    bundle: Annotated[Path, typer.Argument(help="The bundle to evaluate.")],
    corpus: Annotated[list[Path] | None, typer.Option(help="Held-out text (default: the held-out slice of the "
                                                           "distillation / default corpus).")] = None,
    model: Annotated[str | None, typer.Option(help="The full model (default: the manifest's base_model.id).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON.")] = None,
    png: Annotated[Path | None, typer.Option(help="Write the distillation curve as PNG.")] = None,
    int8: Annotated[bool, typer.Option(help="Also score int8 versions of the emulators.")] = True,
    max_docs: Annotated[int, typer.Option(help="Documents to score.")] = 64,
    key: Annotated[Path | None, typer.Option(help="Signing key whose public half verifies the bundle.")] = None,
) -> None:
    """Fidelity of the layer-drop and distilled emulators against the full model, with their memory."""
    try:
        signing_key, _ = load_or_create_signing_key(key)
        verified = verify_bundle(bundle, signing_key.public_key())
        with console.status("scoring the full model and the emulators"):
            report = fidelity_report(verified, signing_key.public_key(), model=model, corpus=corpus,
                                     max_docs=max_docs, int8=int8)
    except EXPECTED as error:
        fail_with(error)
    table = Table(title=f"emulator fidelity: {bundle}")
    for column in ("variant", "perplexity", "normalized_error", "cosine", "param MiB"):
        table.add_column(column, justify="right")
    for name, row in report.items():
        cells = [f"{row[k]:.4f}" if k in row else "" for k in ("perplexity", "normalized_error", "cosine")]
        table.add_row(name, *cells, f"{row['memory']['param_bytes'] / 2**20:.1f}")
    console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"json {json_out}")
    curve = read_curve(verified)
    if png is not None and curve:
        console.print(f"curve {plot_curve(curve, png)}")
    elif png is not None:
        console.print("no distillation curve: the bundle was never distilled")
