"""ONNX export: fp32 parity with torch at two shapes with padding, and one LoRA base graph with adapter files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from coordinator.export.onnx import OnnxExportError, export_onnx, export_onnx_lora
from coordinator.export.onnx_session import max_abs_diff, ort_session, run_ort

VOCAB = 100
R, ALPHA = 4, 8
LORA_MODULES = {
    "bert": ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value",
             "bert.encoder.layer.1.output.dense"],
    "llama": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"],
}
HEADS = {"bert": ["classifier.weight", "classifier.bias"], "llama": []}
SHAPES = [(3, 7), (1, 12)]  # two batch sizes and lengths: the axes are dynamic


def tiny(family: str) -> PreTrainedModel:
    torch.manual_seed(0)
    if family == "bert":
        return BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            num_labels=3, max_position_embeddings=64)).eval()
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


def batch(family: str, size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with padding (rows padded by 0, 2, 4 or a single row by 2): left for the causal LM, right else."""
    ids = torch.randint(3, VOCAB, (size, length), generator=torch.Generator().manual_seed(size * 100 + length))
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 2, 4][:size] if size > 1 else [2]):
        if pad:
            mask[row, :pad] = 0 if family == "llama" else 1
            mask[row, length - pad:] = 1 if family == "llama" else 0
    ids[mask == 0] = 0
    return ids, mask


def random_adapter(base: PreTrainedModel, family: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    modules = dict(base.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    for name in LORA_MODULES[family]:
        linear = modules[name]
        assert isinstance(linear, torch.nn.Linear)
        tensors[f"{name}.lora_A.weight"] = torch.randn(R, linear.in_features, generator=gen) * 0.2
        tensors[f"{name}.lora_B.weight"] = torch.randn(linear.out_features, R, generator=gen) * 0.2
    params = dict(base.named_parameters())
    for name in HEADS[family]:
        tensors[name] = torch.randn(params[name].shape, generator=gen)
    return tensors


def merged(base: PreTrainedModel, family: str, tensors: dict[str, torch.Tensor]) -> PreTrainedModel:
    """The torch model the adapter stands for: B @ A * alpha / r added to each weight, heads replaced."""
    model = copy.deepcopy(base).eval()
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    with torch.no_grad():
        for name in LORA_MODULES[family]:
            delta = tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"] * (ALPHA / R)
            modules[name].weight.add_(delta)
        for name in HEADS[family]:
            params[name].copy_(tensors[name])
    return model


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_export_matches_torch_at_two_shapes_with_padding(family: str, tmp_path: Path) -> None:
    model = tiny(family)
    attention = model.config._attn_implementation
    path = tmp_path / "model.onnx"
    export_onnx(model, path)
    assert model.config._attn_implementation == attention  # traced with eager attention, then restored
    proto = onnx.load(str(path))
    ops = [node.op_type for node in proto.graph.node]
    if family == "bert":  # onnxruntime's fusions: one Attention per layer, no SkipLayerNormalization
        assert ops.count("Attention") == 2 and ops.count("BiasGelu") == 2 and "SkipLayerNormalization" not in ops
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert not any(t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
                   for t in proto.graph.initializer)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp file left behind
    assert not model.training and not any(m.training for m in model.modules())
    session = ort_session(path)
    for size, length in SHAPES:
        ids, mask = batch(family, size, length)
        assert (mask == 0).any()
        diff = max_abs_diff(model, session, ids, mask)
        print(f"{family} batch={size} len={length} max_abs_diff={diff:.3g}")
        assert diff < 1e-4
    logits = run_ort(session, *(t.numpy() for t in batch(family, *SHAPES[0])))
    assert logits.shape == ((3, 7, VOCAB) if family == "llama" else (3, 3))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_lora_base_graph_with_adapter_files_matches_merged_torch(family: str, tmp_path: Path) -> None:
    base = tiny(family)
    adapters = {f"owner-{i}": random_adapter(base, family, seed=i + 1) for i in range(2)}
    before = dict(base.named_parameters())
    paths = export_onnx_lora(base, LORA_MODULES[family], R, ALPHA, adapters, tmp_path)
    after = dict(base.named_parameters())  # the base model is left as it was: same parameters, no hooks
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not any(m._forward_hooks for m in base.modules())
    assert paths == {a: tmp_path / f"{a}.onnx_adapter" for a in adapters}
    assert all(p.is_file() for p in paths.values())

    proto = onnx.load(str(tmp_path / "base.onnx"))
    inputs = {i.name for i in proto.graph.input}
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    names = json.loads((tmp_path / "lora_inputs.json").read_text())
    assert set(names) == set(adapters["owner-0"])
    for tensor, graph_input in names.items():
        assert graph_input in inputs and graph_input in initializers  # overridable, with a default
        if ".lora_" in tensor:
            assert not initializers[graph_input].any()
        else:
            assert np.array_equal(initializers[graph_input], before[tensor].detach().numpy())
    assert not any(name.startswith("_offsite_model.classifier") for name in initializers)  # no unused copy

    session = ort_session(tmp_path / "base.onnx")
    outputs = []
    for size, length in SHAPES:
        ids, mask = batch(family, size, length)
        diff = max_abs_diff(base, session, ids, mask)
        print(f"{family} lora base batch={size} len={length} max_abs_diff={diff:.3g}")
        assert diff < 1e-4
        for adapter_id, tensors in adapters.items():
            diff = max_abs_diff(merged(base, family, tensors), session, ids, mask, paths[adapter_id])
            print(f"{family} lora {adapter_id} batch={size} len={length} max_abs_diff={diff:.3g}")
            assert diff < 1e-4
        outputs.append([run_ort(session, ids.numpy(), mask.numpy(), paths[a]) for a in adapters])
        plain = run_ort(session, ids.numpy(), mask.numpy())
        assert np.abs(outputs[-1][0] - outputs[-1][1]).max() > 1e-2  # adapters are not ignored
        assert np.abs(outputs[-1][0] - plain).max() > 1e-2
    # An adapter is active for its run only: the next plain run is the base model again.
    ids, mask = batch(family, *SHAPES[0])
    assert max_abs_diff(base, session, ids, mask) < 1e-4


def test_adapter_missing_or_misshapen_tensor_is_named(tmp_path: Path) -> None:
    base = tiny("llama")
    good = random_adapter(base, "llama", seed=1)
    modules = LORA_MODULES["llama"]
    missing = {k: v for k, v in good.items() if k != f"{modules[1]}.lora_B.weight"}
    with pytest.raises(OnnxExportError, match=rf"'owner-x'.*'{modules[1]}\.lora_B\.weight'"):
        export_onnx_lora(base, modules, R, ALPHA, {"owner-x": missing}, tmp_path)
    wrong = {**good, f"{modules[0]}.lora_A.weight": torch.zeros(R + 1, 32)}
    with pytest.raises(OnnxExportError, match=rf"'{modules[0]}\.lora_A\.weight' has shape \(5, 32\)"):
        export_onnx_lora(base, modules, R, ALPHA, {"owner-x": wrong}, tmp_path)
    head = {**good, "lm_head.weight": torch.zeros(3, 3)}
    with pytest.raises(OnnxExportError, match=r"'lm_head\.weight' has shape \(3, 3\)"):
        export_onnx_lora(base, modules, R, ALPHA, {"owner-x": head}, tmp_path)
    stray = {**good, "model.layers.9.mlp.up_proj.lora_A.weight": torch.zeros(R, 32)}
    with pytest.raises(OnnxExportError, match=r"'model\.layers\.9\.mlp\.up_proj\.lora_A\.weight'"):
        export_onnx_lora(base, modules, R, ALPHA, {"owner-x": stray}, tmp_path)
    with pytest.raises(OnnxExportError, match=r"'model\.norm'.*not an nn\.Linear"):
        export_onnx_lora(base, ["model.norm"], R, ALPHA, {}, tmp_path)
    assert not (tmp_path / "base.onnx").exists()  # checked before anything is written
