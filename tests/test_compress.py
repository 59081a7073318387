"""Emulator compressors: CKA, contiguous clustering, CRaSh sharing, low rank, spread adapters, and their bundles."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from transformers import BertConfig, BertModel, PreTrainedModel

from coordinator.bundles import build_bundle
from emulator.cka import cka_matrix, contiguous_clusters, linear_cka
from emulator.compress import (
    COMPRESSORS,
    CompressionPlan,
    LayerDropConfig,
    RankConfig,
    ShareConfig,
    compress,
    compression_plan,
    register_compressor,
)
from emulator.corpus import Batch
from emulator.distill import DistillConfig, match_pairs
from emulator.errors import CompressError
from emulator.families import block_list
from emulator.loading import embedded_model_path, load_tokenizer
from emulator.quantize import load_emulator
from emulator.split import LayerPlan, SplitConfig, SplitError
from emulator.surgery import Emulator, adapter_spec, build_emulator, extract_adapter, plug_adapter, tie_shared_slots
from protos.bundle import verify_bundle
from protos.manifests import CompressionInfo, LayerMapEntry
from tests.models import N_LAYERS, VOCAB, model_output, tiny_model

GEN = torch.Generator().manual_seed(0)
CALIBRATION = [Batch(torch.randint(3, VOCAB, (2, 12), generator=GEN), torch.ones(2, 12, dtype=torch.long))
               for _ in range(2)]
INPUT = CALIBRATION[0].input_ids
SPREAD = SplitConfig(adapter_blocks=(0, 3))  # middle runs [1, 2] and [4, 5]
PLANS = {
    "layer_drop": CompressionPlan((("layer_drop", LayerDropConfig(2)),)),
    "share": CompressionPlan((("share", ShareConfig(2)),)),
    "rank": CompressionPlan((("rank", RankConfig(0.25)),)),
    "share+rank": CompressionPlan((("share", ShareConfig(2)), ("rank", RankConfig(0.25)))),
}


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def block_state(model: PreTrainedModel, emulator: Emulator, slot: int) -> dict[str, torch.Tensor]:
    return dict(block_list(model, emulator.location)[slot].state_dict())


# -- CKA ------------------------------------------------------------------------------------------------------------

def test_cka_is_one_for_identical_and_invariant_to_orthogonal_maps_and_scaling() -> None:
    x, y = torch.randn(64, 8, generator=GEN), torch.randn(64, 5, generator=GEN)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=GEN))  # (8, 8) orthogonal
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x @ q, 7.0 * y) == pytest.approx(linear_cka(x, y), abs=1e-6)
    assert linear_cka(x, y) < 0.5  # independent noise is far from alike
    assert linear_cka(x, x + 0.1 * torch.randn(64, 8, generator=GEN)) > 0.9


def test_cka_matrix_is_symmetric_with_unit_diagonal_and_checks_shapes() -> None:
    feats = [torch.randn(32, d, generator=GEN) for d in (4, 6, 8)]
    sim = cka_matrix(feats)
    assert sim.shape == (3, 3)
    assert torch.allclose(sim, sim.T) and torch.allclose(sim.diagonal(), torch.ones(3))
    with pytest.raises(ValueError, match="same n tokens"):
        cka_matrix([torch.randn(32, 4), torch.randn(31, 4)])
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        cka_matrix([torch.randn(32), torch.randn(32)])


# -- clustering -----------------------------------------------------------------------------------------------------

def _cost(sim: torch.Tensor, clusters: list[list[int]]) -> float:
    return sum(min(sum(1 - float(sim[i, r]) for i in c) for r in c) for c in clusters)


def test_clusters_follow_similar_blocks() -> None:
    groups = [0, 0, 0, 1, 1, 2]  # three blocks of alike outputs
    sim = torch.tensor([[1.0 if a == b else 0.2 for b in groups] for a in groups])
    clusters = contiguous_clusters(sim, [0] * 6, 3)
    assert [members for members, _ in clusters] == [[0, 1, 2], [3, 4], [5]]


@pytest.mark.parametrize("seed", range(4))
def test_clusters_are_contiguous_cover_the_middle_and_are_optimal(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    L = 7
    a = torch.rand(L, L, generator=g)
    sim = (a + a.T) / 2
    sim.fill_diagonal_(1.0)
    runs = [0, 0, 0, 1, 1, 1, 1]
    for k in range(2, L + 1):
        clusters = contiguous_clusters(sim, runs, k)
        members = [m for m, _ in clusters]
        assert len(members) == k and [i for m in members for i in m] == list(range(L))
        assert all(m == list(range(m[0], m[-1] + 1)) and len({runs[i] for i in m}) == 1 for m in members)
        assert all(rep in m for m, rep in clusters)
        # brute force over every way to cut the two runs into k contiguous clusters
        best = min(_cost(sim, [list(range(s, e)) for s, e in itertools.pairwise((0, *cuts, L))])
                   for cuts in itertools.combinations(range(1, L), k - 1) if 3 in cuts)
        assert _cost(sim, members) == pytest.approx(best)


def test_clusters_must_cover_every_run_and_fit_the_middle() -> None:
    sim = torch.ones(4, 4)
    with pytest.raises(CompressError, match="^clusters") as error:
        contiguous_clusters(sim, [0, 0, 1, 1], 1)
    assert error.value.field == "clusters"
    with pytest.raises(CompressError, match="^clusters"):
        contiguous_clusters(sim, [0, 0, 1, 1], 5)


# -- adapter placement and the layer map ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("blocks", "n_layers", "message"),
    [((), 6, "at least one"), ((3, 1), 6, "sorted and unique"), ((1, 1), 6, "sorted and unique"),
     ((-1, 2), 6, ">= 0"), ((0, 6), 6, "out of range"), ((0, 1, 2, 3, 4, 5), 6, "names all 6 blocks")],
)
def test_invalid_adapter_blocks_name_the_field(blocks: tuple[int, ...], n_layers: int, message: str) -> None:
    with pytest.raises(SplitError, match=message) as error:
        SplitConfig(adapter_blocks=blocks).plan(n_layers)
    assert error.value.field == "adapter_blocks"
    assert error.value.render(lambda name: f"--{name.replace('_', '-')}").startswith("--adapter-blocks")


def test_a_prefix_and_suffix_is_the_original_layout() -> None:
    assert SplitConfig(adapter_blocks=(0, 1, 11), keep=3, bottom=0, top=0).plan(12) == SplitConfig(2, 1, 3).plan(12)


def test_spread_adapters_interleave_in_full_order() -> None:
    plan = SplitConfig(adapter_blocks=(0, 5, 18, 23), keep=6).plan(24)
    assert plan.adapter_blocks == [0, 5, 18, 23] and plan.bottom == [] and plan.top == []
    assert plan.emulator_sources == sorted(plan.emulator_sources)
    roles = {e.full_index: e.role for e in plan.entries}
    assert all(roles[a] == "adapter" for a in (0, 5, 18, 23))
    assert [plan.entries[s].role for s in plan.middle_slots] == ["middle"] * 6
    assert plan.middle == [i for i in range(24) if i not in (0, 5, 18, 23)]


def test_layer_map_round_trips_for_old_and_new_layouts() -> None:
    full = tiny_model("llama")
    shared = compress(full, SPREAD, PLANS["share"], calibration=CALIBRATION).plan
    for plan in (SplitConfig(1, 2, 2).plan(N_LAYERS), SPREAD.plan(N_LAYERS), shared):
        data = json.loads(json.dumps(plan.to_json()))
        assert LayerPlan.from_json(N_LAYERS, data) == plan
        entries = [LayerMapEntry.from_json(e) for e in data]  # the manifest's entries accept them too
        assert [e.to_json() for e in entries] == data
    assert any("stands_for" in e for e in shared.to_json())
    # a map whose reader dropped stands_for still loads, as unshared slots in place of their sources
    bare = [{k: v for k, v in e.items() if k != "stands_for"} for e in shared.to_json()]
    assert LayerPlan.from_json(N_LAYERS, bare).emulator_sources == shared.emulator_sources
    with pytest.raises(SplitError, match="full-model order"):
        LayerPlan.from_json(N_LAYERS, [{**e, "emulator_index": 3 - i} for i, e in enumerate(bare[:4])])


def test_middle_targets_match_distillation_and_follow_shared_and_spread_slots() -> None:
    old = SplitConfig(2, 2, 8).plan(24)
    assert old.middle_targets == match_pairs(Emulator(tiny_model("bert"), old, None), per_block=True)  # type: ignore[arg-type]
    spread = SplitConfig(adapter_blocks=(0, 3), keep=2).plan(N_LAYERS)  # slots: 0a 1m 3a 5m
    assert spread.emulator_sources == [0, 1, 3, 5] and spread.middle_targets == [(2, 3), (4, 6)]
    shared = LayerPlan.build(N_LAYERS, [0, 5], [(2, 1), (2, 2), (2, 3), (4, 4)])
    assert shared.middle_targets == [(2, 2), (3, 3), (4, 4), (5, 5)]


def test_old_compression_info_still_loads() -> None:
    old = {"method": "uniform-layer-drop", "bottom": 1, "top": 1, "keep": 1, "kept_middle": [2]}
    info = CompressionInfo.from_json(old)
    assert info.compressors is None and info.shared is None and info.to_json() == old


# -- the registry and plans -----------------------------------------------------------------------------------------

def test_registry_refuses_duplicates_and_distill_is_a_post_step() -> None:
    assert set(COMPRESSORS) >= {"layer_drop", "share", "rank", "distill"}
    with pytest.raises(CompressError, match="already registered"):
        register_compressor("share", ShareConfig, COMPRESSORS["share"].apply)
    with pytest.raises(CompressError, match="emulator distill"):
        compress(tiny_model("bert"), SplitConfig(1, 1), CompressionPlan((("distill", DistillConfig()),)))


def test_plans_round_trip_and_name_their_settings() -> None:
    plan = PLANS["share+rank"]
    assert CompressionPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert plan.method == "share+rank" and PLANS["layer_drop"].method == "uniform-layer-drop"
    assert plan.describe() == "share(clusters=2) + rank(rank_fraction=0.25)"
    assert compression_plan(["share,rank"], clusters=2, rank_fraction=0.25) == plan
    assert compression_plan([]) == CompressionPlan((("layer_drop", LayerDropConfig(None)),))
    for kwargs, field in [({"names": ["share"]}, "clusters"), ({"names": ["rank"]}, "rank_fraction"),
                          ({"names": ["share"], "clusters": 2, "keep": 3}, "keep"),
                          ({"names": ["layer_drop"], "clusters": 2}, "clusters"), ({"names": ["prune"]}, "compressor"),
                          ({"names": ["distill"]}, "compressor"), ({"names": ["rank"], "rank_fraction": 1.5},
                                                                   "rank_fraction")]:
        with pytest.raises(CompressError) as error:
            compression_plan(**kwargs)  # type: ignore[arg-type]
        assert error.value.field == field
    with pytest.raises(SplitError, match="^keep"):
        compress(tiny_model("bert"), SplitConfig(1, 1, keep=2), PLANS["rank"])


def test_the_default_plan_is_todays_layer_drop() -> None:
    full = tiny_model("gpt2")
    before = state(full)
    today, now = build_emulator(full, SplitConfig(1, 1, 2)), compress(full, SplitConfig(1, 1, 2))
    assert now.plan == today.plan
    assert all(torch.equal(v, now.model.state_dict()[k]) for k, v in today.model.state_dict().items())
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in before.items())


# -- share ----------------------------------------------------------------------------------------------------------

def test_share_keeps_identity_blocks_together() -> None:
    full = tiny_model("llama")
    with torch.no_grad():  # blocks 2 and 3 pass their input through: blocks 1, 2, 3 give one output
        for i in (2, 3):
            full.model.layers[i].self_attn.o_proj.weight.zero_()
            full.model.layers[i].mlp.down_proj.weight.zero_()
    emulator = compress(full, SplitConfig(1, 1), PLANS["share"], calibration=CALIBRATION)
    assert emulator.plan.kept_middle == [1, 1, 1, 4]
    assert emulator.plan.shared == {1: [1, 2, 3]}
    assert [e.position for e in emulator.plan.entries] == list(range(N_LAYERS))


def test_share_keeps_the_full_depth_with_copies_of_the_representatives() -> None:
    full = tiny_model("bert")
    emulator = compress(full, SPREAD, PLANS["share"], calibration=CALIBRATION)
    plan = emulator.plan
    assert plan.n_emulator_layers == N_LAYERS and len(block_list(emulator.model, emulator.location)) == N_LAYERS
    assert len(plan.distinct_middle) == 2 and set(plan.distinct_middle) <= {1, 2, 4, 5}
    full_blocks = block_list(full, emulator.location)
    for slot, entry in enumerate(plan.entries):
        expected = full_blocks[entry.full_index].state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in block_state(emulator.model, emulator, slot).items())
    # re-tying the copies changes nothing but memory
    out = model_output(emulator.model, INPUT)
    assert tie_shared_slots(emulator) > 0
    blocks = block_list(emulator.model, emulator.location)
    for slots in plan.shared.values():
        assert all(p is q for p, q in zip(blocks[slots[0]].parameters(), blocks[slots[1]].parameters(), strict=True))
    assert torch.equal(model_output(emulator.model, INPUT), out)


def test_share_reads_the_default_public_corpus_with_a_tokenizer() -> None:
    torch.manual_seed(0)
    full = BertModel(BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, max_position_embeddings=128)).eval()
    tokenizer = load_tokenizer(str(embedded_model_path()))
    plan = CompressionPlan((("share", ShareConfig(1, calibration_batches=1, seq_len=16)),))
    emulator = compress(full, SplitConfig(1, 1), plan, tokenizer=tokenizer)
    assert emulator.plan.kept_middle in ([1, 1], [2, 2])
    with pytest.raises(CompressError, match="calibration text"):
        compress(full, SplitConfig(1, 1), plan)


# -- rank -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("family", "projection"), [("llama", "q_proj"), ("bert", "attention.self.query"),
                                                    ("gpt2", "attn.c_attn")])
def test_rank_lowers_the_projections_of_the_middle_only(family: str, projection: str) -> None:
    full = tiny_model(family)
    before = state(full)
    emulator = compress(full, SplitConfig(1, 1), PLANS["rank"])
    prefix = emulator.location.prefix
    emu, ref = emulator.model.state_dict(), full.state_dict()
    for slot, entry in enumerate(emulator.plan.entries):
        for key, value in block_state(emulator.model, emulator, slot).items():
            original = ref[f"{prefix}.{entry.full_index}.{key}"]
            assert value.shape == original.shape
            is_target = entry.role == "middle" and key.endswith(".weight") and projection in key
            if is_target:
                r = max(1, int(0.25 * min(value.shape)))
                assert int(torch.linalg.matrix_rank(value)) <= r < int(torch.linalg.matrix_rank(original))
            elif entry.role != "middle" or "mlp" in key or "intermediate" in key:
                assert torch.equal(value, original), key
    assert all(torch.equal(v, emu[k]) for k, v in ref.items() if not k.startswith(prefix + "."))
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in before.items())  # the full model is untouched


def test_rank_refuses_projections_that_match_nothing() -> None:
    plan = CompressionPlan((("rank", RankConfig(0.5, projections=("no_such_proj",))),))
    with pytest.raises(CompressError, match="^projections no_such_proj match no") as error:
        compress(tiny_model("llama"), SplitConfig(1, 1), plan)
    assert error.value.field == "projections"


# -- every family x every compressor: exact plug-in, adapters where they belong --------------------------------------

@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("name", sorted(PLANS))
def test_plug_in_stays_exact_for_spread_adapters(family: str, name: str) -> None:
    full = tiny_model(family)
    original = state(full)
    emulator = compress(full, SPREAD, PLANS[name], calibration=CALIBRATION)
    assert model_output(emulator.model, INPUT).isfinite().all()
    spec = adapter_spec(full, emulator.location, emulator.plan)

    plug_adapter(full, spec, extract_adapter(emulator.model, spec, from_emulator=True))  # unchanged adapter
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in original.items())

    with torch.no_grad():  # "tune" the adapter on the emulator: every adapter slot shifts by its full index + 1
        blocks = block_list(emulator.model, emulator.location)
        for entry in emulator.plan.entries:
            if entry.role == "adapter":
                for p in blocks[entry.emulator_index].parameters():
                    p.add_(entry.full_index + 1)
    plug_adapter(full, spec, extract_adapter(emulator.model, spec, from_emulator=True))
    prefix = emulator.location.prefix
    for key, value in full.state_dict().items():
        index = int(key[len(prefix) + 1:].split(".")[0]) if key.startswith(prefix + ".") else None
        if index in (0, 3) and value.is_floating_point() and key in dict(full.named_parameters()):
            assert torch.allclose(value, original[key] + index + 1), key
        else:
            assert torch.equal(value, original[key]), key


# -- bundles --------------------------------------------------------------------------------------------------------

def test_a_share_and_rank_bundle_records_its_compression_and_loads(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    full = tiny_model("gpt2")
    out = tmp_path / "bundle"
    summary = build_bundle(full, str(embedded_model_path()), "tiny-gpt2", SPREAD, out, key, task="causal-lm",
                           compression=PLANS["share+rank"], calibration=CALIBRATION)
    manifest = verify_bundle(out, key.public_key()).manifest
    compression = manifest.compression
    assert compression.method == "share+rank" and compression.adapter_blocks == [0, 3]
    assert CompressionPlan.from_json(compression.compressors or []) == PLANS["share+rank"]
    assert compression.keep == 2 and compression.kept_middle == summary.kept_middle
    assert compression.shared == {str(k): v for k, v in summary.shared.items()} and compression.shared
    assert [e.role for e in manifest.layer_map].count("adapter") == 2
    plan = LayerPlan.from_json(N_LAYERS, [e.to_json() for e in manifest.layer_map])
    loaded = Emulator(load_emulator(out), plan, build_emulator(full, SplitConfig(1, 1)).location)
    rebuilt = compress(full, SPREAD, PLANS["share+rank"], calibration=CALIBRATION)
    assert plan == rebuilt.plan
    assert torch.equal(model_output(loaded.model, INPUT), model_output(rebuilt.model, INPUT))
    tie_shared_slots(loaded)
    assert torch.equal(model_output(loaded.model, INPUT), model_output(rebuilt.model, INPUT))
    assert ("compressors", "share(clusters=2) + rank(rank_fraction=0.25)") in summary.rows()


def test_a_default_bundle_keeps_the_old_manifest_fields(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    build_bundle(tiny_model("bert"), str(embedded_model_path()), "tiny-bert", SplitConfig(1, 1, 2), tmp_path / "b", key)
    manifest = verify_bundle(tmp_path / "b", key.public_key()).manifest
    assert manifest.compression.method == "uniform-layer-drop" and manifest.compression.kept_middle == [1, 4]
    assert manifest.compression.compressors == [{"name": "layer_drop", "config": {"keep": 2}}]
    assert manifest.compression.shared is None and manifest.compression.adapter_blocks is None
    assert all("stands_for" not in e.to_json() for e in manifest.layer_map)


def test_the_build_command_takes_compressors_and_names_its_flags(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from coordinator.cli import app
    from tests.models import tiny_classifier_dir

    runner, home, model = CliRunner(), tmp_path / "home", str(tiny_classifier_dir(tmp_path / "model"))
    assert runner.invoke(app, ["keys", "init", "--dir", str(home)]).exit_code == 0
    base = ["emulator", "build", "--model", model, "--key", str(home / "coordinator.key")]
    for extra, flag in [(["--compressor", "share", "--keep", "1"], "--keep"), (["--compressor", "share"], "--clusters"),
                        (["--adapter-blocks", "0,x"], "--adapter-blocks"),
                        (["--rank-fraction", "0.5"], "--rank-fraction")]:
        result = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), *extra])
        assert result.exit_code == 2 and f"error: {flag}" in result.output, result.output
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--compressor", "share,rank", "--clusters", "2",
                                 "--rank-fraction", "0.5", "--adapter-blocks", "0,2"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["compression"]["method"] == "share+rank" and manifest["compression"]["adapter_blocks"] == [0, 2]
    assert [e["full_index"] for e in manifest["layer_map"]] == [0, 1, 2, 3]
