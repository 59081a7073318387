"""Tampered, misplaced and malformed sealed deltas: each ends with a typed status, nothing written, still serving."""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable

import grpc
import pytest
import torch
from safetensors.torch import save

from tests.wire_support import (
    SealedDelta,
    Wire,
    good_delta,
    requests,
    resign,
    with_header,
)

pytest_plugins = ("tests.wire_support",)

CODE = grpc.StatusCode


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def chunks_of(sealed: SealedDelta) -> list[bytes]:
    return [bytes(c) for c in sealed.chunks()]


def expect(wire: Wire, messages: list, code: grpc.StatusCode, words: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(grpc.RpcError) as caught:
        wire.send(messages)
    assert caught.value.code() == code, caught.value.details()
    assert words.lower() in caught.value.details().lower(), caught.value.details()
    wire.assert_nothing_written()


def accepted_afterwards(wire: Wire, sealed: SealedDelta) -> None:
    """The untampered delta still goes through: nothing was half written and no slot was taken."""
    receipt = wire.client.submit_sealed(sealed)
    assert not receipt.already_accepted
    assert wire.store.round_status("jobA", 1)[2] == 1


def test_valid_delta_is_accepted(wire: Wire) -> None:
    accepted_afterwards(wire, wire.seal())


# (name, transform of the chunk list) for ciphertext-level tampering; "last" is the final chunk
CHUNK_CASES: dict[str, Callable[[list[bytes]], list[bytes]]] = {
    "bit in first chunk": lambda c: [flip(c[0], 5), *c[1:]],
    "bit in middle chunk": lambda c: [*c[:4], flip(c[4], 100), *c[5:]],
    "bit in final chunk": lambda c: [*c[:-1], flip(c[-1], 3)],
    "bit in a tag": lambda c: [*c[:2], flip(c[2], len(c[2]) - 1, 7), *c[3:]],
    "reordered chunks": lambda c: [c[1], c[0], *c[2:]],
}


@pytest.mark.parametrize("case", sorted(CHUNK_CASES))
def test_tampered_ciphertext_fails_the_signature(wire: Wire, case: str) -> None:
    sealed = wire.seal()
    expect(wire, requests(sealed, CHUNK_CASES[case](chunks_of(sealed))), CODE.UNAUTHENTICATED, "signature")
    accepted_afterwards(wire, sealed)


@pytest.mark.parametrize("case", sorted(CHUNK_CASES))
def test_tampered_ciphertext_signed_by_its_owner_fails_decryption(wire: Wire, case: str) -> None:
    sealed = wire.seal()
    bad = resign(sealed, wire.owners["alice"], chunks=CHUNK_CASES[case](chunks_of(sealed)))
    expect(wire, requests(bad), CODE.INVALID_ARGUMENT, "authentication")
    accepted_afterwards(wire, sealed)


def test_dropped_final_chunk(wire: Wire) -> None:
    sealed = wire.seal()
    expect(wire, requests(sealed, chunks_of(sealed)[:-1]), CODE.INVALID_ARGUMENT, "final chunk is missing")


def test_extra_chunk_after_final(wire: Wire) -> None:
    sealed = wire.seal()
    chunks = chunks_of(sealed)
    expect(wire, requests(sealed, [*chunks, chunks[0]]), CODE.INVALID_ARGUMENT, "after the final chunk")


def test_duplicated_chunk(wire: Wire) -> None:
    sealed = wire.seal()
    c = chunks_of(sealed)
    expect(wire, requests(sealed, [c[0], *c]), CODE.INVALID_ARGUMENT, "after the final chunk")
    same_length = resign(sealed, wire.owners["alice"], chunks=[c[0], c[0], *c[2:]])
    expect(wire, requests(same_length), CODE.INVALID_ARGUMENT, "chunk 1")
    accepted_afterwards(wire, sealed)


def test_flipped_header_bit(wire: Wire) -> None:
    sealed = wire.seal(upload_id="up-1")
    at = sealed.header_json.index(b'"up-1"') + 4  # up-1 -> up-0: still a valid header, no longer signed
    bad = SealedDelta(sealed.header, flip(sealed.header_json, at), sealed.wrapped_key, sealed.signature,
                      sealed.ciphertext)
    expect(wire, requests(bad), CODE.UNAUTHENTICATED, "signature")
    broken = SealedDelta(sealed.header, flip(sealed.header_json, 0, 1), sealed.wrapped_key, sealed.signature,
                         sealed.ciphertext)
    expect(wire, requests(broken), CODE.INVALID_ARGUMENT, "header")
    accepted_afterwards(wire, sealed)


def test_flipped_wrapped_key_bit(wire: Wire) -> None:
    sealed = wire.seal()
    bad_key = flip(sealed.wrapped_key, 40)
    expect(wire, requests(SealedDelta(sealed.header, sealed.header_json, bad_key, sealed.signature,
                                      sealed.ciphertext)), CODE.UNAUTHENTICATED, "signature")
    expect(wire, requests(resign(sealed, wire.owners["alice"], wrapped_key=bad_key)), CODE.INVALID_ARGUMENT,
           "wrapped data key")
    accepted_afterwards(wire, sealed)


def test_sealed_for_job_a_round_1_sent_to_job_b_round_2(wire: Wire) -> None:
    sealed = wire.seal(job_id="jobA", round=1)
    moved = with_header(sealed, job_id="jobB", round=2)
    expect(wire, requests(SealedDelta(sealed.header, moved, sealed.wrapped_key, sealed.signature,
                                      sealed.ciphertext)), CODE.UNAUTHENTICATED, "signature")
    # even its own owner cannot move it: the header is bound into the key wrapping
    expect(wire, requests(resign(sealed, wire.owners["alice"], header_json=moved)), CODE.INVALID_ARGUMENT,
           "wrapped data key")
    assert wire.store.round_status("jobB", 2)[2] == 0
    accepted_afterwards(wire, sealed)


def test_ciphertext_resigned_by_another_owner(wire: Wire) -> None:
    sealed = wire.seal(owner="alice")
    expect(wire, requests(resign(sealed, wire.owners["bob"])), CODE.UNAUTHENTICATED, "signature")
    as_bob = with_header(sealed, owner_id="bob")
    expect(wire, requests(resign(sealed, wire.owners["bob"], header_json=as_bob)), CODE.FAILED_PRECONDITION,
           "sender_key_id")
    from protos.crypto import key_id

    as_bob = with_header(sealed, owner_id="bob", sender_key_id=key_id(wire.owners["bob"].public_key()))
    expect(wire, requests(resign(sealed, wire.owners["bob"], header_json=as_bob)), CODE.INVALID_ARGUMENT,
           "wrapped data key")
    accepted_afterwards(wire, sealed)


def _safetensors_with(header: dict, data: bytes) -> bytes:  # type: ignore[type-arg]
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _payload(case: str) -> bytes:
    delta = good_delta()
    if case == "pickle renamed .safetensors":
        return pickle.dumps({k: v.tolist() for k, v in delta.items()})
    if case == "header length 2^63":
        return struct.pack("<Q", 2**63) + b"{}" + bytes(64)
    if case == "overlapping offsets":
        return _safetensors_with({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))
    changes: dict[str, Callable[[dict[str, torch.Tensor]], None]] = {
        "extra tensor": lambda d: d.update(z=torch.zeros(2)),
        "missing tensor": lambda d: d.pop("b"),
        "renamed tensor": lambda d: d.update(bb=d.pop("b")),
        "wrong shape": lambda d: d.update(b=torch.zeros(33)),
        "wrong dtype": lambda d: d.update(b=d["b"].double()),
        "NaN": lambda d: d["a"].view(-1).__setitem__(3, float("nan")),
        "Inf": lambda d: d["b"].__setitem__(0, float("inf")),
        "1e30": lambda d: d["a"].view(-1).__setitem__(0, 1e30),
    }
    changes[case](delta)
    return save(delta)


PAYLOAD_WORDS = {
    "pickle renamed .safetensors": "header length", "header length 2^63": "header length",
    "overlapping offsets": "overlap", "extra tensor": "unknown tensors", "missing tensor": "missing tensors",
    "renamed tensor": "tensors", "wrong shape": "shape", "wrong dtype": "dtype", "NaN": "nan", "Inf": "infinite",
    "1e30": "norm",
}


@pytest.mark.parametrize("case", sorted(PAYLOAD_WORDS))
def test_bad_payload_is_refused_after_decryption(wire: Wire, case: str) -> None:
    sealed = wire.seal(_payload(case))
    expect(wire, requests(sealed), CODE.INVALID_ARGUMENT, PAYLOAD_WORDS[case])
    accepted_afterwards(wire, wire.seal(upload_id="up-2"))
