"""The data owner's Flower ClientApp (Message API). Flower carries the control plane: the round's config and the
global adapter come in, a small receipt goes back. The delta itself travels sealed over the coordinator's gRPC
service (``SubmitDelta``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.owner import owner_data, train_round
from client.receipts import save_receipt
from client.settings import NODE_CONFIG_KEYS, OwnerSettings
from client.transport import CoordinatorClient
from emulator.device import pick_device
from emulator.methods import MethodConfig
from emulator.train import TrainConfig
from protos import crypto
from protos.bundle import BundleError, VerifiedBundle, verify_bundle_dir
from protos.messages import JobInfo
from protos.round_config import RoundConfig
from protos.round_message import MESSAGE_KEY, SIGNATURE_KEY, RoundMessage, RoundMessageError, verify_round_message

__all__ = ["NODE_CONFIG_KEYS", "app", "make_client_app"]


def settings_of(context: Context, overrides: Mapping[str, Any]) -> OwnerSettings:
    """Run config, then this node's config, then in-process overrides (simulation)."""
    return OwnerSettings.from_config({**dict(context.run_config), **dict(context.node_config), **dict(overrides)})


def ensure_bundle(client: CoordinatorClient, job: JobInfo, cache_dir: Path,
                  coordinator_key: Ed25519PublicKey) -> VerifiedBundle:
    """The job's bundle from the owner's local cache, downloaded (resumably) only when missing or invalid."""
    target = cache_dir / job.bundle_digest
    if (target / "bundle").is_dir():
        try:
            cached = verify_bundle_dir(target / "bundle", coordinator_key)
            if cached.digest == job.bundle_digest:
                return cached
        except BundleError:
            pass
    return client.download_bundle(job, target)


def verify_train_message(msg: Message, coordinator_key: Ed25519PublicKey,
                         job_id: str) -> tuple[RoundConfig, dict[str, torch.Tensor], RoundMessage]:
    """The round config and global adapter of a train message, once the coordinator's signed round message it
    carries verifies with the pinned key and names this job, this round, this config and this adapter's digest;
    :class:`RoundMessageError` otherwise (the owner then trains nothing and submits nothing)."""
    config = msg.content.config_records.get("config")
    arrays = msg.content.array_records.get("global")
    if config is None or arrays is None:
        raise RoundMessageError("the train message has no 'config' or no 'global' record")
    message, signature = config.get(MESSAGE_KEY), config.get(SIGNATURE_KEY)
    if not isinstance(message, bytes) or not isinstance(signature, bytes) or not message or not signature:
        raise RoundMessageError("the train message carries no signed round message")
    round_config = RoundConfig.from_config({k: v for k, v in config.items() if k not in (MESSAGE_KEY, SIGNATURE_KEY)})
    adapter = arrays.to_torch_state_dict()
    verified = verify_round_message(coordinator_key, message, signature, job_id=job_id, config=round_config,
                                    adapter=adapter)
    return round_config, adapter, verified


def handle_train(msg: Message, context: Context, overrides: Mapping[str, Any]) -> Message:
    settings = settings_of(context, overrides)
    torch.set_num_threads(settings.threads)
    coordinator_key = crypto.load_public_key(settings.coordinator_key)
    # before anything else: a message the coordinator's key does not vouch for is refused (the reply is an error)
    round_config, global_adapter, _ = verify_train_message(msg, coordinator_key, settings.job_id)
    owner_key = crypto.load_private_key(settings.key_path)
    with CoordinatorClient(
        settings.coordinator,
        coordinator_key=coordinator_key,
        owner_key=owner_key,
        root_certificates=settings.root_cert.read_bytes() if settings.root_cert else None,
        insecure=settings.insecure,
    ) as client:
        job = client.get_job(settings.job_id)
        cache = settings.cache_dir / crypto.key_id(owner_key.public_key())
        bundle = ensure_bundle(client, job, cache, coordinator_key)
        train_examples, val_examples = owner_data(
            settings.train_file, bundle.manifest.task, bundle.manifest.labels, settings.partition_id,
            settings.num_partitions, settings.partition, settings.seed, settings.val_fraction,
        )
        # each owner and round draws its own batches and dropout
        seed = round_config.seed + 7919 * settings.partition_id + round_config.round
        result, _ = train_round(bundle, global_adapter, train_examples, val_examples,
                                MethodConfig.from_round(round_config), TrainConfig.from_round(round_config, seed=seed),
                                show_progress=settings.progress, device=pick_device(settings.device))
        receipt = client.submit_delta(job, round_config.round, result.delta, owner_key,
                                      num_examples=result.num_examples)
    save_receipt(settings.cache_dir / "receipts", receipt)  # for `offsite-client status --receipts`
    metrics = MetricRecord({"num-examples": result.num_examples, **result.metrics})
    reply = RecordDict({
        "receipt": ConfigRecord({"upload-id": receipt.upload_id, "owner-id": receipt.owner_id,
                                 "plaintext-sha256": receipt.plaintext_sha256}),
        "metrics": metrics,
    })
    return Message(content=reply, reply_to=msg)


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose settings come from Flower's configs, plus ``overrides`` (used by ``simulate``)."""
    app = ClientApp()
    fixed = dict(overrides or {})

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, fixed)

    return app


app = make_client_app()
