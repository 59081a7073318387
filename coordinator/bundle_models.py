"""The models a verified bundle names: the coordinator's full model (checked against the manifest's weights
digest), the bundle's emulator with its layer plan, and the split it was built with."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from transformers import PreTrainedModel

from coordinator.bundles import state_dict_digest
from coordinator.errors import CoordinatorError
from emulator.families import locate_blocks
from emulator.loading import embedded_model_path, load_model, resolve_model
from emulator.quantize import load_emulator
from emulator.split import LayerPlan, SplitConfig
from emulator.surgery import Emulator
from protos.bundle import VerifiedBundle, verify_bundle


class BaseModelMismatchError(CoordinatorError):
    """The full model is not the one the bundle was built from."""

    bad_input = True


def open_bundle(bundle: Path | VerifiedBundle, public_key: Ed25519PublicKey) -> VerifiedBundle:
    return bundle if isinstance(bundle, VerifiedBundle) else verify_bundle(Path(bundle), public_key)


def model_source(verified: VerifiedBundle, model: str | None) -> str:
    """Where the bundle's full model lives: ``model``, else the manifest's ``base_model.id``."""
    source = model or verified.manifest.base_model.id
    return str(embedded_model_path()) if source.startswith("embedded:") else resolve_model(source)


def check_base_model(verified: VerifiedBundle, full: PreTrainedModel) -> None:
    expected = verified.manifest.base_model.weights_sha256
    if state_dict_digest(full) != expected:
        raise BaseModelMismatchError(f"model: the full model's weights differ from the bundle's base model "
                                     f"(sha256 {expected[:16]}...)")


def load_full_model(verified: VerifiedBundle, model: str | None = None) -> PreTrainedModel:
    """The coordinator's full model for ``verified``, checked against the manifest's weights digest."""
    full = load_model(model_source(verified, model), verified.manifest.task)
    check_base_model(verified, full)
    return full


def split_of(verified: VerifiedBundle) -> SplitConfig:
    compression = verified.manifest.compression
    if compression.adapter_blocks:
        return SplitConfig(adapter_blocks=tuple(compression.adapter_blocks), keep=compression.keep)
    return SplitConfig(compression.bottom, compression.top, compression.keep)


def bundle_emulator(verified: VerifiedBundle, full: PreTrainedModel) -> Emulator:
    location = locate_blocks(full)
    plan = LayerPlan.from_json(location.n_layers, verified.manifest.layer_map_json())
    return Emulator(load_emulator(verified), plan, location)
