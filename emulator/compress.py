"""Emulator compressors, in one registry: each is a pure function ``(emulator, config, context) -> emulator`` with a
frozen, validated config dataclass, and they compose in order (``share`` then ``rank``, say).

- ``layer_drop``: keep ``keep`` middle blocks, uniformly spaced (offsite tuning, Xiao et al. 2023).
- ``share``: CRaSh (Zhang et al., EMNLP 2023). Adjacent middle blocks whose outputs are alike (linear CKA on public
  text) form contiguous clusters; each cluster keeps one block, which fills every slot of the cluster, so the
  emulator keeps the full depth (the adapter sees inputs at the depths it will see in the full model) while a data
  owner holds only ``clusters`` distinct middle blocks.
- ``rank``: truncated SVD of the kept blocks' attention projections, shapes kept (ScaleOT, GradOT): it weakens the
  emulator as a model while the adapter's gradients, which flow through the same architecture, stay close.
- ``distill``: today's distillation (:mod:`emulator.distill`); it trains, so it is a post-step on a built bundle
  (``offsite-coordinator emulator distill``), registered here so that plans and manifests can name it.

A compressor never modifies its input emulator nor the full model: it returns a new emulator.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from emulator.cka import cka_matrix, contiguous_clusters
from emulator.corpus import Batch, batch_at, default_corpus, encode, prepare_tokenizer, read_documents, split_documents
from emulator.distill import DistillConfig
from emulator.errors import CompressError
from emulator.families import BlockLocation, block_list, locate_blocks
from emulator.split import LayerPlan, SplitConfig, SplitError, uniform_keep_indices
from emulator.surgery import Emulator, select_blocks

# Attention projections by module-name suffix: LLaMA/Qwen2/Mistral, OPT, BERT, GPT-2 (Conv1D), BLOOM, GPT-NeoX.
ATTENTION_PROJECTIONS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "out_proj",
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "attn.c_attn", "attn.c_proj", "query_key_value", "self_attention.dense", "attention.dense",
)
MAX_CKA_TOKENS = 1024  # tokens per block output kept for CKA: the centred Gram matrices are (n, n)
METHOD_NAMES = {"layer_drop": "uniform-layer-drop"}  # the manifest's historical name for layer drop


@dataclass(frozen=True)
class CompressContext:
    """What a compressor may read besides the emulator: the full model (never modified) and calibration text."""

    full: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None = None  # for the default public corpus
    calibration: Sequence[Batch] | None = None  # ready batches instead (tests, other corpora)


Compressor = Callable[[Emulator, Any, CompressContext], Emulator]


@dataclass(frozen=True)
class CompressorSpec:
    name: str
    config_type: type
    apply: Compressor
    post_step: bool = False  # needs training: runs on a built bundle, not in :func:`compress`


COMPRESSORS: dict[str, CompressorSpec] = {}


def register_compressor(name: str, config_type: type, apply: Compressor, *, post_step: bool = False) -> CompressorSpec:
    if name in COMPRESSORS:
        raise CompressError(f"{{compressor}} {name!r} is already registered")
    COMPRESSORS[name] = spec = CompressorSpec(name, config_type, apply, post_step)
    return spec


def _reslot(emulator: Emulator, middle: list[tuple[int, int]]) -> Emulator:
    """A new emulator: the same adapter slots, and middle slots ``(current slot, stands_for)`` in full order, each
    a copy of that current slot."""
    entries = emulator.plan.entries
    plan = emulator.plan.with_middle([(entries[slot].full_index, pos) for slot, pos in middle])
    adapter_slot = {e.full_index: e.emulator_index for e in entries if e.role != "middle"}
    queue = iter(slot for slot, _ in middle)  # with_middle keeps the middle's order (positions non-decreasing)
    picks = [adapter_slot[e.full_index] if e.role != "middle" else next(queue) for e in plan.entries]
    return Emulator(select_blocks(emulator.model, emulator.location, picks), plan, emulator.location)


# -- layer_drop -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerDropConfig:
    keep: int | None = None  # middle blocks kept; None keeps them all

    def __post_init__(self) -> None:
        if self.keep is not None and self.keep < 1:
            raise CompressError(f"{{keep}} must be >= 1, got {self.keep}")


def layer_drop(emulator: Emulator, config: LayerDropConfig, context: CompressContext) -> Emulator:
    """Keep ``keep`` of the middle slots, uniformly spaced over the whole middle (first and last always kept)."""
    slots = emulator.plan.middle_slots
    k = len(slots) if config.keep is None else config.keep
    if k > len(slots):
        raise CompressError(f"{{keep}} {k} exceeds the {len(slots)} middle blocks of this model")
    entries = emulator.plan.entries
    return _reslot(emulator, [(slots[i], entries[slots[i]].position) for i in uniform_keep_indices(len(slots), k)])


# -- share (CRaSh) --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShareConfig:
    clusters: int  # distinct middle blocks kept
    calibration_batches: int = 4
    batch_size: int = 4
    seq_len: int = 64

    def __post_init__(self) -> None:
        for name in ("clusters", "calibration_batches", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise CompressError(f"{{{name}}} must be >= 1, got {getattr(self, name)}")


def calibration_batches(context: CompressContext, config: ShareConfig) -> list[Batch]:
    """The context's batches, else the default public corpus's training side (never the held-out slice the
    fidelity report scores), in the deterministic order distillation uses."""
    if context.calibration is not None:
        return list(context.calibration)[: config.calibration_batches]
    if context.tokenizer is None:
        raise CompressError("{compressor} share needs calibration text: give a tokenizer or calibration batches")
    docs = split_documents(read_documents([default_corpus()]), DistillConfig.held_out_percent)[0]
    tokenizer = prepare_tokenizer(context.tokenizer)
    return [encode(tokenizer, batch_at(docs, i, config.batch_size, seed=0), config.seq_len)
            for i in range(config.calibration_batches)]


@torch.no_grad()
def block_outputs(model: PreTrainedModel, location: BlockLocation, slots: Sequence[int],
                  batches: Iterable[Batch]) -> list[torch.Tensor]:
    """Each slot's block output on the non-padding tokens of ``batches``: (n_tokens, D) per slot, caught by forward
    hooks (so no final-norm confusion), at most :data:`MAX_CKA_TOKENS` evenly strided tokens."""
    blocks = block_list(model, location)
    caught: dict[int, list[torch.Tensor]] = {s: [] for s in slots}
    mask: list[torch.Tensor] = []

    def hook(slot: int) -> Callable[..., None]:
        def save(_module: nn.Module, _args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, D)
            caught[slot].append(hidden[mask[0]].float())  # (tokens, D)
        return save

    handles = [blocks[s].register_forward_hook(hook(s)) for s in slots]
    try:
        for batch in batches:
            mask[:] = [batch.attention_mask.bool()]
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    outputs = [torch.cat(caught[s]) for s in slots]  # (N, D) each
    stride = max(1, math.ceil(outputs[0].shape[0] / MAX_CKA_TOKENS))
    return [o[::stride] for o in outputs]


def share(emulator: Emulator, config: ShareConfig, context: CompressContext) -> Emulator:
    """CRaSh layer sharing: cluster the middle by the CKA of its blocks' outputs, keep each cluster's medoid, and
    fill the cluster's slots with copies of it. The emulator keeps its depth; the layer map records the sharing
    (equal ``full_index``, and ``stands_for`` the slot's own place)."""
    slots = emulator.plan.middle_slots
    entries = emulator.plan.entries
    outputs = block_outputs(emulator.model, emulator.location, slots, calibration_batches(context, config))
    runs = [s - j for j, s in enumerate(slots)]  # constant along a run of consecutive emulator slots
    clusters = contiguous_clusters(cka_matrix(outputs), runs, config.clusters)
    middle = [(slots[rep], entries[slots[i]].position) for members, rep in clusters for i in members]
    return _reslot(emulator, middle)


# -- rank -----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RankConfig:
    rank_fraction: float  # kept singular values, as a fraction of min(out, in) (at least 1)
    projections: tuple[str, ...] = ATTENTION_PROJECTIONS  # module-name suffixes

    def __post_init__(self) -> None:
        object.__setattr__(self, "projections", tuple(self.projections))  # a list from JSON
        if not 0 < self.rank_fraction <= 1:
            raise CompressError(f"{{rank_fraction}} must be in (0, 1], got {self.rank_fraction}")
        if not self.projections or not all(isinstance(p, str) and p for p in self.projections):
            raise CompressError("{projections} must be non-empty module-name suffixes")

    def rank_of(self, weight: torch.Tensor) -> int:
        return max(1, math.floor(self.rank_fraction * min(weight.shape)))


def truncated(weight: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-``r`` approximation of a (m, n) matrix, same shape and dtype: ``U_r diag(S_r) V_r^T``."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)  # (m, q), (q,), (q, n)
    return ((u[:, :r] * s[:r]) @ vh[:r]).to(weight.dtype)  # (m, n)


def projection_modules(model: nn.Module, block_prefix: str, suffixes: Sequence[str]) -> dict[str, nn.Module]:
    """Relative name -> module of the Linear / Conv1D modules under one block whose name ends with a suffix."""
    block = model.get_submodule(block_prefix)
    return {name: module for name, module in block.named_modules()
            if isinstance(module, nn.Linear | Conv1D) and any(name == s or name.endswith("." + s) for s in suffixes)}


@torch.no_grad()
def rank(emulator: Emulator, config: RankConfig, context: CompressContext) -> Emulator:
    """Truncated SVD of the middle slots' projections, in a copy. Conv1D (GPT-2) stores W^T, which has the same
    truncation, so it needs no special case. Slots sharing a source stay identical (computed once, copied)."""
    model = copy.deepcopy(emulator.model)
    prefix, plan = emulator.location.prefix, emulator.plan
    groups: dict[int, list[int]] = {}
    for slot in plan.middle_slots:
        groups.setdefault(plan.entries[slot].full_index, []).append(slot)
    for slots in groups.values():
        modules = projection_modules(model, f"{prefix}.{slots[0]}", config.projections)
        if not modules:
            raise CompressError(f"{{projections}} {', '.join(config.projections)} match no Linear / Conv1D module "
                                f"of block {prefix}.{slots[0]}")
        for name, module in modules.items():
            weight = module.get_parameter("weight")  # (out, in); Conv1D: (in, out)
            low = truncated(weight, config.rank_of(weight))
            for slot in slots:
                model.get_submodule(f"{prefix}.{slot}.{name}").get_parameter("weight").copy_(low)
    return Emulator(model, plan, emulator.location)


# -- distill (a post-step) ------------------------------------------------------------------------------------------

def distill_post_step(emulator: Emulator, config: DistillConfig, context: CompressContext) -> Emulator:
    raise CompressError("{compressor} distill trains the kept blocks, so it runs on a built bundle: build it with the "
                        "other compressors, then run `offsite-coordinator emulator distill BUNDLE --out OUT`")


register_compressor("layer_drop", LayerDropConfig, layer_drop)
register_compressor("share", ShareConfig, share)
register_compressor("rank", RankConfig, rank)
register_compressor("distill", DistillConfig, distill_post_step, post_step=True)


# -- plans ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompressionPlan:
    """Compressors in the order they run, with their configs; JSON as ``[{"name": ..., "config": {...}}]``."""

    steps: tuple[tuple[str, Any], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple((name, config) for name, config in self.steps))
        if not self.steps:
            raise CompressError("{compressor} needs at least one compressor")
        for name, config in self.steps:
            if name not in COMPRESSORS:
                raise CompressError(f"{{compressor}} {name!r} is not one of {', '.join(COMPRESSORS)}")
            if not isinstance(config, COMPRESSORS[name].config_type):
                raise CompressError(f"{{compressor}} {name} takes a {COMPRESSORS[name].config_type.__name__}, "
                                    f"got {type(config).__name__}")

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.steps]

    @property
    def method(self) -> str:
        """The manifest's ``compression.method``: ``uniform-layer-drop`` for today's default, else names joined."""
        return "+".join(METHOD_NAMES.get(name, name) for name in self.names)

    def to_json(self) -> list[dict[str, Any]]:
        return [{"name": name, "config": json.loads(json.dumps(asdict(config)))} for name, config in self.steps]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> CompressionPlan:
        try:
            return cls(tuple((str(s["name"]), COMPRESSORS[str(s["name"])].config_type(**s["config"])) for s in data))
        except (KeyError, TypeError) as error:
            raise CompressError(f"{{compressor}} not a compression plan: {error}") from error

    def describe(self) -> str:
        """``share(clusters=4) + rank(rank_fraction=0.25)``: each compressor with the settings off their defaults."""
        return " + ".join(f"{name}({', '.join(_changed(config))})" for name, config in self.steps)


def _changed(config: Any) -> list[str]:
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if value != default:
            out.append(f"{f.name}={value}")
    return out


def default_plan(keep: int | None = None) -> CompressionPlan:
    """Today's behaviour: uniform layer drop keeping ``keep`` middle blocks (all when None)."""
    return CompressionPlan((("layer_drop", LayerDropConfig(keep)),))


def compression_plan(names: Iterable[str], *, keep: int | None = None, clusters: int | None = None,
                     rank_fraction: float | None = None) -> CompressionPlan:
    """The plan a CLI or a run config asks for: ``names`` (each may be a comma list) with the flat settings each
    compressor takes; a setting whose compressor is not named is refused, naming the setting."""
    chosen = [n.strip() for item in names for n in item.split(",") if n.strip()] or ["layer_drop"]
    for name in chosen:
        if name not in COMPRESSORS or COMPRESSORS[name].post_step:
            usable = [n for n, spec in COMPRESSORS.items() if not spec.post_step]
            hint = "; distill is a post-step: `emulator distill`" if name == "distill" else ""
            raise CompressError(f"{{compressor}} {name!r} is not one of {', '.join(usable)}{hint}")
    for setting, value, owner in (("keep", keep, "layer_drop"), ("clusters", clusters, "share"),
                                  ("rank_fraction", rank_fraction, "rank")):
        if value is not None and owner not in chosen:
            raise CompressError(f"{{{setting}}} is a setting of {owner}, which {{compressor}} does not name")
    steps: list[tuple[str, Any]] = []
    for name in chosen:
        if name == "layer_drop":
            steps.append((name, LayerDropConfig(keep)))
        elif name == "share":
            if clusters is None:
                raise CompressError("{clusters} is required by the share compressor")
            steps.append((name, ShareConfig(clusters)))
        elif name == "rank":
            if rank_fraction is None:
                raise CompressError("{rank_fraction} is required by the rank compressor")
            steps.append((name, RankConfig(rank_fraction)))
    return CompressionPlan(tuple(steps))


def compress(full: PreTrainedModel, split: SplitConfig, plan: CompressionPlan | None = None, *,
             tokenizer: PreTrainedTokenizerBase | None = None,
             calibration: Sequence[Batch] | None = None) -> Emulator:
    """The emulator of ``full``: the adapter placed by ``split``, the middle compressed by ``plan`` in order.

    Without a plan this is today's uniform layer drop with ``split.keep`` (the same emulator as
    :func:`emulator.surgery.build_emulator`); with one, ``split.keep`` must be unset (layer_drop's ``keep`` says it).
    ``full`` is never modified, and the result never shares a tensor with it.
    """
    if plan is None:
        plan = default_plan(split.keep)
    elif split.keep is not None:
        raise SplitError("{keep} belongs to the layer_drop compressor when a compression plan is given")
    location = locate_blocks(full)
    start: LayerPlan = replace(split, keep=None).plan(location.n_layers)
    emulator = Emulator(full, start, location)  # the identity: read only, every compressor copies
    context = CompressContext(full, tokenizer, calibration)
    for name, config in plan.steps:
        emulator = COMPRESSORS[name].apply(emulator, config, context)
    return emulator
