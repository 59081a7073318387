"""The coordinator's signed round message: what a train message carries so a data owner can check, before it
trains, that the global adapter, the round and the round config are the ones the coordinator's key vouches for.

The coordinator's service signs canonical JSON ``{job_id, round, adapter_sha256, round_config}`` under the
context label ``round-message/v1``; the ServerApp only relays it (it holds no coordinator key). The adapter
digest is :func:`adapter_sha256`, the one canonical digest both sides compute. Floats in the round config are
signed as their ``repr`` strings (canonical JSON carries no floats)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors.torch import save

from protos.crypto import SignatureError, canonical_json, sha256_hex, sign, verify
from protos.errors import ProtocolError
from protos.round_config import RoundConfig

ROUND_MESSAGE_CONTEXT = "round-message/v1"
# ConfigRecord keys of a train message that hold the signed round message (bytes).
MESSAGE_KEY, SIGNATURE_KEY = "round-message", "round-signature"


class RoundMessageError(ProtocolError):
    """A train message's signed round message is missing, malformed, not signed by the coordinator, or does not
    match the adapter, the round or the round config it came with."""


def canonical_adapter(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter as train messages carry it: float32, contiguous, on the CPU, in sorted name order."""
    return {name: tensors[name].detach().to("cpu", torch.float32).contiguous() for name in sorted(tensors)}


def adapter_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The safetensors bytes (no metadata) of :func:`canonical_adapter`."""
    return save(canonical_adapter(tensors))


def adapter_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """THE digest of a global adapter: sha256 of :func:`adapter_bytes`, hex."""
    return sha256_hex(adapter_bytes(tensors))


def signed_round_config(config: RoundConfig) -> dict[str, Any]:
    return {k: repr(v) if isinstance(v, float) else v for k, v in config.to_json().items()}


@dataclass(frozen=True)
class RoundMessage:
    job_id: str
    round: int
    adapter_sha256: str
    round_config: dict[str, Any]

    def to_bytes(self) -> bytes:
        return canonical_json({"job_id": self.job_id, "round": self.round, "adapter_sha256": self.adapter_sha256,
                               "round_config": self.round_config})

    @classmethod
    def from_bytes(cls, raw: bytes) -> RoundMessage:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or set(data) != {"job_id", "round", "adapter_sha256", "round_config"}:
                raise ValueError("unexpected fields")
            message = cls(str(data["job_id"]), data["round"], str(data["adapter_sha256"]), data["round_config"])
            if not isinstance(message.round, int) or not isinstance(message.round_config, dict):
                raise ValueError("malformed round or round_config")
        except (ValueError, TypeError) as error:
            raise RoundMessageError(f"malformed round message: {error}") from error
        if message.to_bytes() != bytes(raw):
            raise RoundMessageError("the round message is not canonical JSON")
        return message


def sign_round_message(key: Ed25519PrivateKey, job_id: str, config: RoundConfig,
                       adapter: Mapping[str, torch.Tensor]) -> tuple[bytes, bytes]:
    """(message bytes, signature) for round ``config.round`` of ``job_id`` with this global adapter."""
    message = RoundMessage(job_id, config.round, adapter_sha256(adapter), signed_round_config(config)).to_bytes()
    return message, sign(key, ROUND_MESSAGE_CONTEXT, message)


def verify_round_message(public_key: Ed25519PublicKey, message: bytes, signature: bytes, *, job_id: str,
                         config: RoundConfig, adapter: Mapping[str, torch.Tensor]) -> RoundMessage:
    """Raise :class:`RoundMessageError` unless ``signature`` is the coordinator's over ``message`` and the message
    names this job, ``config``'s round, ``config`` itself and the digest of ``adapter``."""
    try:
        verify(public_key, bytes(signature), ROUND_MESSAGE_CONTEXT, bytes(message))
    except SignatureError as error:
        raise RoundMessageError("the round message is not signed by the coordinator's key") from error
    parsed = RoundMessage.from_bytes(bytes(message))
    if parsed.job_id != job_id:
        raise RoundMessageError(f"the round message is for job {parsed.job_id!r}, not {job_id!r}")
    if parsed.round != config.round:
        raise RoundMessageError(f"the round message is for round {parsed.round}, not {config.round}")
    if parsed.round_config != signed_round_config(config):
        raise RoundMessageError("the round config differs from the one the coordinator signed")
    if parsed.adapter_sha256 != adapter_sha256(adapter):
        raise RoundMessageError("the global adapter differs from the one the coordinator signed")
    return parsed
