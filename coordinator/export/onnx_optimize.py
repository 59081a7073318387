"""Graph-level speed-ups for the ONNX export of BERT encoders: eager attention while tracing, fusions after.

Traced with transformers' ``sdpa`` attention, a BERT graph carries a boolean mask with NaN guards (``IsNaN`` and
``Where`` per layer) that onnxruntime's BERT optimiser cannot match; the ``eager`` implementation exports a plain
``MatMul``/``Softmax`` pattern that is cheaper to run and fuses. :func:`fuse_bert` then folds each layer's
self-attention into one ``Attention`` op (raw 2-D mask, so any padding pattern stays exact) and the bias + erf GELU
into ``BiasGelu``. ``SkipLayerNormalization`` and ``EmbedLayerNormalization`` are left out on purpose: on the CPU
provider the first is slower than the ``Add`` + ``LayerNormalization`` it replaces, and the second assumes the
default position ids. Everything stays fp32, within ~1e-7 of the unfused graph.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import onnx
from transformers import PreTrainedModel

FUSED_MODEL_TYPES = ("bert",)  # encoders traced with eager attention and fused; the tests check them against torch


@contextlib.contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """A BERT ``model`` runs transformers' eager attention inside the block; its own implementation is restored after.

    Other families keep theirs: a causal LM traced with eager attention bakes the tracing shape into its mask.
    """
    before: Any = getattr(model.config, "_attn_implementation", None)
    if before in (None, "eager") or getattr(model.config, "model_type", None) not in FUSED_MODEL_TYPES:
        yield
        return
    try:
        model.set_attn_implementation("eager")
    except (ValueError, ImportError, AttributeError):  # a model with no eager path exports as it is
        yield
        return
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def fuse_bert(proto: onnx.ModelProto, model: PreTrainedModel) -> onnx.ModelProto | None:
    """``proto`` with onnxruntime's BERT fusions; None for a non-BERT model or when a layer's attention won't fuse."""
    config = model.config
    if getattr(config, "model_type", None) not in FUSED_MODEL_TYPES:
        return None
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_raw_attention_mask(True)
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    options.enable_embed_layer_norm = False
    log = logging.getLogger("onnxruntime.transformers")  # it warns about every pattern it does not find
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        fused = optimize_model(onnx.ModelProto.FromString(proto.SerializeToString()), model_type="bert",
                               num_heads=int(config.num_attention_heads), hidden_size=int(config.hidden_size),
                               optimization_options=options, opt_level=0)
    finally:
        log.setLevel(level)
    layers = int(config.num_hidden_layers)
    if sum(node.op_type == "Attention" for node in fused.model.graph.node) != layers:
        return None
    return fused.model
