"""Offsite-tuning vs full fine-tuning: training throughput (tokens/s) and peak memory, one model, one run.

Each configuration runs in its own subprocess (``--worker NAME``), so its peak memory is its own. A worker imports,
notes its RSS (the baseline), builds its model (a random GPT-2 medium shape from a config with a fixed seed, or
``--model smollm2`` / a local checkpoint; OT: builds the full model, cuts the 2-8-2 emulator out of it, deletes the
full model), resets the kernel's RSS high-water mark (so that building the full model, which a data owner never
holds, does not count), then trains a few steps with AdamW. Reported memory on CPU: the absolute peak RSS
(``ru_maxrss``) and the training-attributable peak = peak minus baseline; ratios use the latter. On CUDA the model
moves to the GPU after building and memory is ``torch.cuda.max_memory_allocated`` (peak reset after building).

Precision (``--dtype``), applied identically to every row: ``fp32``; or ``bf16``, mixed precision: parameters
that do not train (the emulator's frozen blocks and embeddings, LoRA's base weights) are stored in bf16, trainable
parameters stay fp32 (master weights; full fine-tuning therefore keeps every weight in fp32), and the forward pass
and loss run under bf16 autocast. ``--checkpointing`` turns on activation checkpointing for every row.

    PYTHONPATH=. python benchmarks/ot_vs_full.py [--model smollm2] [--device auto|cpu|cuda] [--dtype fp32|bf16]
        [--checkpointing] [--steps 3] [--seq-len 512] [--quick] [--json PATH]

To add a row, add one entry to ``SETUPS``; rows with a ``ratio_key`` get ``throughput_ratio_<key>=`` and
``memory_ratio_<key>=`` lines (OT over full for throughput, full over OT for memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "benchmarks" / "results" / "ot_vs_full.json"
RESULT_PREFIX = "RESULT "
SPLIT = (2, 2, 8)  # bottom, top, kept middle blocks: the paper's 2-8-2
LORA_R = 8


@dataclass(frozen=True)
class Setup:
    label: str
    method: str | None  # None: full fine-tuning of every parameter; else an emulator.methods method on the emulator
    ratio_key: str | None = None  # suffix of this row's ratio lines; None for the reference row
    prepare: Callable[[Any], Any] | None = None  # applied to the emulator (emulator.surgery.Emulator) first


def int8_middle(emulator: Any) -> None:
    """Weight-only int8 for the emulator's frozen middle blocks (what ``--quantize int8`` ships)."""
    from emulator.quantize import quantize

    quantize(emulator, "int8")


SETUPS: dict[str, Setup] = {
    "full": Setup("full fine-tuning", None),
    "ot_layers": Setup("OT 2-8-2 layers", "layers", "layers"),
    "ot_lora": Setup(f"OT 2-8-2 lora r{LORA_R}", "lora", "lora"),
    "ot_lora_int8": Setup(f"OT 2-8-2 lora r{LORA_R} + int8 emulator", "lora", "lora_int8",
                          prepare=lambda emulator: int8_middle(emulator)),
}


def model_config(quick: bool) -> Any:
    """GPT-2 medium shape (24 blocks, ~355M parameters), or a tiny model of the same depth for smoke tests."""
    from transformers import GPT2Config

    if quick:
        return GPT2Config(n_layer=24, n_embd=64, n_head=4, vocab_size=1000, n_positions=256, bos_token_id=0,
                          eos_token_id=0)
    return GPT2Config(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024)


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark that ru_maxrss reads (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def describe_model(config: Any, model_path: str | None) -> str:
    shape = f"{config.num_hidden_layers} blocks, d={config.hidden_size}, vocab={config.vocab_size}"
    if model_path:
        return f"{Path(model_path).name} ({config.model_type}) {shape}, pretrained, from {model_path}"
    return f"GPT-2 {shape}, random init"


def build_full(model_path: str | None, quick: bool) -> Any:
    """The full model: a checkpoint (``model_path``) in fp32, or a random GPT-2 of ``model_config(quick)``."""
    import torch
    from transformers import GPT2LMHeadModel

    from emulator.loading import load_model

    torch.manual_seed(0)
    if model_path:
        return load_model(model_path, "causal-lm")
    return GPT2LMHeadModel(model_config(quick))


def worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build one configuration's model, train ``warmup + steps`` steps, and measure; runs in its own process."""
    import ctypes
    import gc

    import torch

    from emulator.device import autocast, cast_frozen, pick_device, to_device
    from emulator.methods import MethodConfig, make_trainable, method_spec
    from emulator.split import SplitConfig
    from emulator.surgery import adapter_spec, build_emulator, count_parameters
    from emulator.train import TrainConfig, loss_of

    steps, warmup, seq_len = args.steps, args.warmup, args.seq_len
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    cuda = device.type == "cuda"
    load_before = os.getloadavg()[0]
    baseline = rss_mb()
    setup = SETUPS[name]
    full = build_full(args.model_path, args.quick)
    full_params = count_parameters(full)
    vocab = int(full.config.vocab_size)
    model_desc = describe_model(full.config, args.model_path)
    if setup.method is None:
        model: torch.nn.Module = full
    else:
        emulator = build_emulator(full, SplitConfig(*SPLIT))
        method = MethodConfig(setup.method, lora_r=LORA_R)
        spec = method_spec(adapter_spec(full, emulator.location, emulator.plan), emulator.model, method)
        del full  # a data owner never holds the full model
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        if setup.prepare is not None:
            setup.prepare(emulator)
        model = make_trainable(emulator.model, spec, method)
    if amp_dtype is not None:
        cast_frozen(model, amp_dtype)  # frozen weights in bf16; trainable ones stay fp32 (none cast for full FT)
    if args.checkpointing:
        get_base_model = getattr(model, "get_base_model", None)  # peft wraps LoRA
        base: Any = get_base_model() if callable(get_base_model) else model
        # non-reentrant: frozen embeddings feed the first checkpointed block an input that needs no grad
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gc.collect()
    if cuda:
        model.to(device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    held_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    build_peak, held_after_build = peak_rss_mb(), rss_mb()
    peak_was_reset = reset_peak_rss()

    train_config = TrainConfig()
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach=False: per-tensor updates, no whole-model temporaries (lowers the full fine-tuning peak the most)
    optimizer = torch.optim.AdamW(params, lr=train_config.lr, weight_decay=train_config.weight_decay, foreach=False)
    input_ids = torch.randint(vocab, (1, seq_len), generator=torch.Generator().manual_seed(0))  # (1, T)
    batch = to_device({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                       "labels": input_ids.clone()}, device)
    model.train()
    times, losses = [], []
    for step in range(warmup + steps):
        start = time.perf_counter()
        with autocast(device, amp_dtype):
            loss = loss_of(model, batch, "causal-lm")[0]  # the same loss and step as emulator.train.train
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_config.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))  # synchronises CUDA, so the step's time is all in
        if cuda:
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        print(f"{name} step {step + 1}/{warmup + steps}: {time.perf_counter() - start:.1f} s, "
              f"rss {rss_mb():.0f} MB", file=sys.stderr, flush=True)
    peak = peak_rss_mb()
    step_s = sum(times) / len(times)
    row = {
        "label": setup.label, "method": setup.method or "full", "ratio_key": setup.ratio_key, "model": model_desc,
        "device": str(device), "dtype": args.dtype, "param_dtypes": held_dtypes, "checkpointing": args.checkpointing,
        "params_held": count_parameters(model), "params_full_model": full_params,
        "params_trainable": sum(p.numel() for p in params), "step_s": step_s, "tokens_per_s": seq_len / step_s,
        "baseline_rss_mb": baseline, "held_after_build_mb": held_after_build, "build_peak_rss_mb": build_peak,
        "peak_rss_mb": peak, "train_peak_mb": peak - baseline, "peak_reset_after_build": peak_was_reset,
        "losses": losses, "load_avg_1min_before_after": [load_before, os.getloadavg()[0]],
    }
    if cuda:  # the GPU's own peak (weights + grads + optimizer + activations) replaces RSS for the ratios
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["train_peak_mb"] = row["peak_cuda_mb"]
    return row


def launch(name: str, args: argparse.Namespace) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--device", args.device,
           "--dtype", args.dtype] + (["--quick"] if args.quick else []) \
        + (["--checkpointing"] if args.checkpointing else []) \
        + (["--model-path", args.model_path] if args.model_path else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)


def collect(name: str, proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker {name} failed (exit {proc.returncode})")
    return dict(json.loads(lines[-1].removeprefix(RESULT_PREFIX)))


def run_all(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """One subprocess per setup: one after another, or all at once for ``--quick`` (timings then contend)."""
    if args.quick:
        procs = {name: launch(name, args) for name in SETUPS}
        return {name: collect(name, proc) for name, proc in procs.items()}
    return {name: collect(name, launch(name, args)) for name in SETUPS}


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    full = results["full"]
    out: dict[str, float] = {}
    for row in results.values():
        if row["ratio_key"]:
            out[f"throughput_ratio_{row['ratio_key']}"] = row["tokens_per_s"] / full["tokens_per_s"]
            out[f"memory_ratio_{row['ratio_key']}"] = full["train_peak_mb"] / row["train_peak_mb"]
    return out


def print_table(results: dict[str, dict[str, Any]], cuda: bool = False) -> None:
    header = f"{'config':<20} {'trainable':>12} {'held params':>12} {'tokens/s':>9} {'step s':>7} " \
             f"{'peak MB':>9} {'train MB':>9} {'build MB':>9}"
    print(header)
    print("-" * len(header))
    for row in results.values():
        print(f"{row['label']:<20} {row['params_trainable']:>12,} {row['params_held']:>12,} "
              f"{row['tokens_per_s']:>9.1f} {row['step_s']:>7.2f} {row['peak_rss_mb']:>9.0f} "
              f"{row['train_peak_mb']:>9.0f} {row['build_peak_rss_mb']:>9.0f}")
    if cuda:
        print("peak MB = absolute peak host RSS; train MB = torch.cuda.max_memory_allocated while training "
              "(weights + grads + optimizer + activations on the GPU), used for the memory ratios; build MB = peak "
              "host RSS while building (OT: includes the full model, which a data owner never holds).")
        return
    print("peak MB = absolute peak RSS while training; train MB = peak RSS minus the RSS right after imports "
          "(weights + grads + optimizer + activations), used for the memory ratios; build MB = peak RSS while "
          "building (OT: includes the full model, which a data owner never holds; excluded by a high-water reset).")


def plot(results: dict[str, dict[str, Any]], path: Path, title: str, memory_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["label"] for row in results.values()]
    fig, (ax_tps, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    ax_tps.bar(labels, [row["tokens_per_s"] for row in results.values()], color="tab:blue")
    ax_tps.set_ylabel("training tokens/s")
    ax_mem.bar(labels, [row["train_peak_mb"] for row in results.values()], color="tab:orange")
    ax_mem.set_ylabel(memory_label)
    for ax in (ax_tps, ax_mem):
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per config (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--seq-len", type=int, default=None, help="batch 1 of this many tokens (default 256; quick 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 2; quick 1)")
    parser.add_argument("--quick", action="store_true", help="a tiny model of the same depth, for a smoke test")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file; the chart goes next to it")
    parser.add_argument("--model", default=None,
                        help="smollm2 (the installed SmolLM2-135M-Instruct), or a local checkpoint path or hub id "
                             "(default: a random GPT-2 medium shape; --quick: a tiny one)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda if available, else cpu (MPS is not measured; default auto)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: frozen weights in bf16 + bf16 autocast, trainable weights fp32 (default fp32)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on every row")
    parser.add_argument("--worker", choices=sorted(SETUPS), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", default=None, help=argparse.SUPPRESS)  # resolved --model, for workers
    args = parser.parse_args()
    args.steps = args.steps or 2
    args.seq_len = args.seq_len or (64 if args.quick else 256)  # 512 (the paper's) runs past 10 GiB on 2 cores
    args.threads = args.threads or (1 if args.quick else 2)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(args.worker, args)))
        return

    from emulator.device import pick_device
    from emulator.errors import EmulatorError
    from emulator.loading import resolve_model

    try:
        # fail here, once, not in every worker; auto never picks MPS (no peak-memory counter to compare with)
        device = pick_device("cpu" if args.device == "auto" and pick_device().type == "mps" else args.device)
        # resolved once, before the workers start: a GGUF model's first use converts it (concurrent workers would
        # each convert it)
        args.model_path = resolve_model(args.model) if args.model else None
    except EmulatorError as error:
        raise SystemExit(f"ot_vs_full: {error}") from error
    args.device = str(device)
    cuda = device.type == "cuda"
    start = time.perf_counter()
    results = run_all(args)
    summary = ratios(results)
    dtype = "float32" if args.dtype == "fp32" else "bf16 mixed (frozen bf16, trainable fp32, autocast)"
    memory_basis = "torch.cuda.max_memory_allocated while training" if cuda else "peak RSS minus RSS after imports"
    meta = {"model": results["full"]["model"], "split": "-".join(map(str, (SPLIT[0], SPLIT[2], SPLIT[1]))),
            "device": args.device, "dtype": dtype, "checkpointing": args.checkpointing, "threads": args.threads,
            "batch": 1, "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup, "quick": args.quick,
            "memory_ratio_basis": memory_basis, "wall_s": time.perf_counter() - start}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results, "ratios": summary}, indent=2) + "\n")
    checkpointing = ", activation checkpointing" if args.checkpointing else ""
    plot(results, args.json.with_suffix(".png"),
         f"Offsite-tuning vs full fine-tuning ({device.type.upper()}, {args.dtype}{checkpointing})",
         "training peak CUDA memory (MB)" if cuda else "training peak RSS over baseline (MB)")

    quick_note = "; QUICK: workers ran concurrently, timings contend" if args.quick else ""
    print(f"model: {meta['model']}; split {meta['split']}; {args.dtype} {device.type.upper()}{checkpointing}, "
          f"{args.threads} threads; batch 1 x {args.seq_len} tokens; {args.warmup} warm-up + {args.steps} timed "
          f"AdamW steps{quick_note}")
    print_table(results, cuda)
    print(f"wrote {args.json} and {args.json.with_suffix('.png')} ({meta['wall_s']:.0f} s)")
    # The issues fix the tail: the four layers/lora lines, then memory_ratio_lora_int8 last.
    tail = ["throughput_ratio_layers", "memory_ratio_layers", "throughput_ratio_lora", "memory_ratio_lora",
            "memory_ratio_lora_int8"]
    for key in [k for k in summary if k not in tail] + [k for k in tail if k in summary]:
        print(f"{key}={summary[key]:.3f}")


if __name__ == "__main__":
    main()
