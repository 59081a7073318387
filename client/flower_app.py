"""The data owner's Flower ClientApp (Message API). Flower carries the control plane: the round's config and the
global adapter come in, a small receipt goes back. The delta itself travels sealed over the coordinator's gRPC
service (``SubmitDelta``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.owner import owner_data, setting, train_round
from client.transport import CoordinatorClient
from emulator.methods import MethodConfig
from emulator.train import TrainConfig
from protos import crypto
from protos.bundle import BundleError, VerifiedBundle, verify_bundle_dir

# What a SuperNode's --node-config may set (run config supplies the rest, e.g. job-id).
NODE_CONFIG_KEYS = frozenset({
    "partition-id", "num-partitions", "coordinator", "coordinator-key", "owner-key", "owners-dir", "cache-dir",
    "train-file", "root-cert", "insecure", "partition", "seed", "val-fraction", "torch-threads", "progress",
    "job-id",
})


def settings_of(context: Context, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Run config, then this node's config, then in-process overrides (simulation)."""
    return {**dict(context.run_config), **dict(context.node_config), **dict(overrides)}


def ensure_bundle(client: CoordinatorClient, job: Any, cache_dir: Path, coordinator_key: Any) -> VerifiedBundle:
    """The job's bundle from the owner's local cache, downloaded (resumably) only when missing or invalid."""
    target = cache_dir / str(job.bundle_digest)
    if (target / "bundle").is_dir():
        try:
            cached = verify_bundle_dir(target / "bundle", coordinator_key)
            if cached.digest == job.bundle_digest:
                return cached
        except BundleError:
            pass
    return client.download_bundle(job, target)


def owner_key_path(settings: Mapping[str, Any], partition_id: int) -> Path:
    if "owner-key" in settings:
        return Path(str(settings["owner-key"]))
    return Path(str(setting(settings, "owners-dir", str))) / f"owner-{partition_id}.key"


def handle_train(msg: Message, context: Context, overrides: Mapping[str, Any]) -> Message:
    settings = settings_of(context, overrides)
    round_config: dict[str, Any] = dict(msg.content.config_records["config"])
    torch.set_num_threads(int(settings.get("torch-threads", max(1, (os.cpu_count() or 2) // 2))))
    partition_id = setting(settings, "partition-id", int)
    num_partitions = setting(settings, "num-partitions", int)
    coordinator_key = crypto.load_public_key(Path(setting(settings, "coordinator-key", str)))
    owner_key = crypto.load_private_key(owner_key_path(settings, partition_id))
    root_cert = settings.get("root-cert")
    with CoordinatorClient(
        setting(settings, "coordinator", str),
        coordinator_key=coordinator_key,
        root_certificates=Path(str(root_cert)).read_bytes() if root_cert else None,
        insecure=bool(settings.get("insecure", False)),
    ) as client:
        job = client.get_job(setting(settings, "job-id", str))
        cache = Path(setting(settings, "cache-dir", str)) / crypto.key_id(owner_key.public_key())
        bundle = ensure_bundle(client, job, cache, coordinator_key)
        task = str(bundle.manifest.get("task"))
        labels = bundle.manifest.get("labels")
        train_examples, val_examples = owner_data(
            Path(setting(settings, "train-file", str)), task, labels, partition_id, num_partitions,
            str(settings.get("partition", "iid")), int(settings.get("seed", 0)),
            float(settings.get("val-fraction", 0.1)),
        )
        method = MethodConfig(str(round_config["method"]), lora_r=int(round_config["lora-r"]),
                              lora_alpha=int(round_config["lora-alpha"]))
        train_config = TrainConfig(
            epochs=int(round_config["epochs"]), lr=float(round_config["lr"]),
            batch_size=int(round_config["batch-size"]), max_length=int(round_config["max-length"]),
            seed=int(round_config["seed"]) + 7919 * partition_id + int(round_config["server-round"]),
        )
        global_adapter = msg.content.array_records["global"].to_torch_state_dict()
        result, _ = train_round(bundle, global_adapter, train_examples, val_examples, method, train_config,
                                show_progress=bool(settings.get("progress", True)))
        receipt = client.submit_delta(job, int(round_config["server-round"]), result.delta, owner_key,
                                      num_examples=result.num_examples)
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
