"""Typed documents validate on read and name the field at fault; RoundConfig and OwnerSettings are the one way
round settings and node settings are read."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from client.settings import NODE_CONFIG_KEYS, OwnerSettings, OwnerSettingsError
from coordinator.federation import FederationSettings
from protos.documents import DocumentError
from protos.manifests import BundleManifest, JobManifest
from protos.round_config import RoundConfig, RoundConfigError

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"version": 1, "method": "layers",
        "tensors": [{"name": "h.0.w", "emulator_name": "h.0.w", "shape": [2, 2], "dtype": "F32", "role": "block"}]}
BUNDLE: dict[str, Any] = {
    "format_version": 1, "kind": "offsite-bundle", "created_at": "2026-11-26T00:00:00.000000Z", "task": "causal-lm",
    "base_model": {"id": "m", "weights_sha256": "ab" * 32, "model_type": "gpt2", "class": "GPT2LMHeadModel",
                   "family": "gpt2", "blocks_prefix": "transformer.h", "n_layers": 4, "num_parameters": 10},
    "layer_map": [{"emulator_index": 0, "full_index": 0, "role": "bottom"},
                  {"emulator_index": 1, "full_index": 2, "role": "middle"},
                  {"emulator_index": 2, "full_index": 3, "role": "top"}],
    "compression": {"method": "uniform-layer-drop", "bottom": 1, "top": 1, "keep": 1, "kept_middle": [2]},
    "adapter": {"method": "layers", "spec_file": "adapter/adapter_spec.json", "spec_sha256": "cd" * 32,
                "weights_file": "adapter/adapter.safetensors", "num_parameters": 4},
    "tokenizer": {"dir": "tokenizer"}, "emulator": {"dir": "emulator", "num_parameters": 7},
    "files": {"emulator/config.json": "ef" * 32},
}
JOB: dict[str, Any] = {
    "kind": "offsite-job-manifest", "job_id": "j", "round": 1, "round_state": "OPEN",
    "bundle": {"digest": "ab" * 32, "tar_sha256": "cd" * 32, "size": 10}, "adapter_spec": SPEC,
    "coordinator": {"key_id": "k", "public_key": "AA=="}, "delta_key": {"key_id": "d", "public_key": "AA=="},
    "limits": {"max_upload_bytes": 1, "max_plaintext_bytes": 1, "chunk_size": 1, "max_delta_norm_ratio": "1.0",
               "max_num_examples": 10},
    "issued_at": "2026-11-26T00:00:00.000000Z",
}


@pytest.mark.parametrize(("cls", "data"), [(BundleManifest, BUNDLE), (JobManifest, JOB)])
def test_documents_round_trip_exactly(cls: type[BundleManifest] | type[JobManifest], data: dict[str, Any]) -> None:
    document = cls.from_json(copy.deepcopy(data))
    assert document.to_json() == data
    assert json.loads(json.dumps(document.to_json())) == data


def _set(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(data)
    *parents, last = path.split(".")
    target = changed
    for key in parents:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return changed


@pytest.mark.parametrize(("cls", "data", "path", "value", "message"), [
    (BundleManifest, BUNDLE, "base_model.n_layers", KeyError, "manifest.base_model.n_layers: missing field"),
    (BundleManifest, BUNDLE, "base_model.n_layers", "4", "manifest.base_model.n_layers: expected int, got str"),
    (BundleManifest, BUNDLE, "base_model.colour", "red", "manifest.base_model.colour: unknown field"),
    (BundleManifest, BUNDLE, "compression.kept_middle", [2, "x"], "manifest.compression.kept_middle[1]: expected int"),
    (BundleManifest, BUNDLE, "task", "vision", "manifest.task: must be one of"),
    (BundleManifest, BUNDLE, "labels", [1], "manifest.labels[0]: expected str"),
    (BundleManifest, BUNDLE, "emulator.quantization", {"method": "int8"}, "manifest.emulator.quantization.granularity"),
    (JobManifest, JOB, "round", True, "manifest.round: expected int, got bool"),
    (JobManifest, JOB, "limits.chunk_size", KeyError, "manifest.limits.chunk_size: missing field"),
    (JobManifest, JOB, "adapter_spec.version", 2, "manifest.adapter_spec: version"),
    (JobManifest, JOB, "kind", "offsite-bundle", "manifest.kind: expected 'offsite-job-manifest'"),
])
def test_a_bad_document_names_the_field(cls: type[BundleManifest] | type[JobManifest], data: dict[str, Any],
                                        path: str, value: Any, message: str) -> None:
    with pytest.raises(DocumentError) as error:
        cls.from_json(_set(data, path, value), "manifest")
    assert str(error.value).startswith(message), str(error.value)


def test_round_config_round_trips_through_flower_config() -> None:
    config = RoundConfig(method="lora", lora_r=4, lr=1e-3, round=3)
    flower = config.to_config()
    assert flower["lora-r"] == 4 and flower["server-round"] == 3 and "lora_r" not in flower
    assert RoundConfig.from_config({**flower, "state-dir": "/x"}) == config  # other run-config keys are ignored
    assert RoundConfig.from_config({"lr": 1}) == RoundConfig(lr=1.0)  # an int where a float goes


@pytest.mark.parametrize(("config", "field", "key"), [
    ({"lr": 0.0}, "lr", "lr"), ({"batch-size": 0}, "batch_size", "batch-size"),
    ({"lora-r": "8"}, "lora_r", "lora-r"), ({"server-round": -1}, "round", "server-round"),
])
def test_a_bad_round_setting_names_the_field(config: dict[str, Any], field: str, key: str) -> None:
    with pytest.raises(RoundConfigError) as error:
        RoundConfig.from_config(config)
    assert error.value.field == field
    assert error.value.render(RoundConfig.config_key).startswith(key)  # as Flower's run config spells it


def test_the_flower_app_config_holds_the_round_config_defaults() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = {k: v for k, v in RoundConfig().to_config().items() if k != "server-round"}
    assert {k: declared[k] for k in defaults} == defaults
    settings = FederationSettings.from_config({**declared, "coordinator": "h:1", "admin-key": "a.key"})
    assert settings.training == RoundConfig() and settings.to_config()["job-id"] == declared["job-id"]
    plain = FederationSettings(str(declared["job-id"]), "h:1", Path("a.key"))  # the dataclass's own defaults
    assert settings == plain
    assert FederationSettings.from_config(settings.to_config()) == settings
    assert set(settings.to_config()) == set(declared)  # every key the ServerApp reads is declared, and no other
    pinned = FederationSettings.from_config({**declared, "coordinator": "h:1", "admin-key": "a.key",
                                             "coordinator-key": "c.pub", "root-cert": "ca.crt"})
    assert (pinned.coordinator_key, pinned.root_cert) == (Path("c.pub"), Path("ca.crt"))
    assert FederationSettings.from_config(pinned.to_config()) == pinned


NODE = {"partition-id": 1, "num-partitions": 2, "coordinator": "h:1", "coordinator-key": "c.pub", "job-id": "j",
        "train-file": "t.jsonl", "cache-dir": "cache", "owner-key": "o.key", "insecure": True}


def test_owner_settings_read_node_config() -> None:
    settings = OwnerSettings.from_config({**NODE, "val-fraction": 0.2, "unrelated-run-key": 1})
    assert settings.partition_id == 1 and settings.key_path == Path("o.key") and settings.val_fraction == 0.2
    assert set(NODE) <= NODE_CONFIG_KEYS


@pytest.mark.parametrize(("change", "field"), [
    ({"partition-id": 2}, "partition_id"), ({"coordinator": None}, "coordinator"),
    ({"seed": "x"}, "seed"), ({"insecure": False}, "root_cert"), ({"partition": "zipf"}, "partition"),
])
def test_a_bad_owner_setting_names_the_key(change: dict[str, Any], field: str) -> None:
    config = {k: v for k, v in {**NODE, **change}.items() if v is not None}
    with pytest.raises(OwnerSettingsError) as error:
        OwnerSettings.from_config(config)
    assert field in error.value.fields
    assert error.value.render(lambda f: f.replace("_", "-")).count(field.replace("_", "-")) >= 1
