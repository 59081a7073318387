"""Wire throughput: sealing/unsealing a 100 MB delta (format v2) vs raw AEAD, the coordinator's receive path vs raw
AEAD, and bundle download vs a local file copy.

Run: ``PYTHONPATH=. python benchmarks/wire.py [--mb 100]``. The last three lines are ``seal_vs_aead=<ratio>`` (the
lower of the sealing and the opening-from-disk ratios), ``receive_vs_aead=<ratio>`` (the coordinator's receive path,
:func:`coordinator.intake.receive_stream`: chunks in memory as gRPC hands them over, each written to a temporary
file and decrypted, both signatures checked; no gRPC, no validation, no fsync) and ``download_vs_copy=<ratio>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from protos.crypto import key_id
from protos.delta_keys import x25519_key_id
from protos.sealed import (
    DEFAULT_CHUNK_SIZE,
    TAG_BYTES,
    ExpectedContext,
    SealedDelta,
    SealedHeader,
    Trailer,
    seal_delta,
    verify_preamble,
)
from protos.sealed_open import Unsealer, open_sealed

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def best_of(runs: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def raw_aead(payload: bytes, chunk: int) -> tuple[Callable[[], object], Callable[[], object]]:
    """Encrypt / decrypt the payload in the same chunks into a fresh output buffer, as sealing and opening do:
    the bare AEAD cost, with no header, hashing, signature or file reads."""
    aead, n = ChaCha20Poly1305(os.urandom(32)), -(-len(payload) // chunk)
    view, step = memoryview(payload), chunk + TAG_BYTES
    sealed: list[bytearray] = []

    def encrypt() -> None:
        cipher = bytearray(len(payload) + TAG_BYTES * n)
        out = memoryview(cipher)
        for i in range(n):
            piece = view[i * chunk:(i + 1) * chunk]
            aead.encrypt_into(i.to_bytes(12, "big"), piece, b"aad", out[i * step:i * step + len(piece) + TAG_BYTES])
        sealed[:] = [cipher]

    encrypt()

    def decrypt() -> None:
        plain, source = bytearray(len(payload)), memoryview(sealed[0])
        out = memoryview(plain)
        for i in range(n):
            piece = source[i * step:i * step + min(chunk, len(payload) - i * chunk) + TAG_BYTES]
            aead.decrypt_into(i.to_bytes(12, "big"), piece, b"aad", out[i * chunk:i * chunk + len(piece) - TAG_BYTES])

    return encrypt, decrypt


def seal_bench(size: int, workdir: Path) -> tuple[float, float, float, float, float]:
    from coordinator.intake import receive_stream

    payload = os.urandom(size)
    owner, recipient = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    encrypt, decrypt = raw_aead(payload, DEFAULT_CHUNK_SIZE)
    aead_enc, aead_dec = best_of(3, encrypt), best_of(3, decrypt)

    def seal() -> SealedDelta:
        return seal_delta(payload, job_id="bench", round=1, owner_id="o", upload_id="u", adapter_spec_digest="0" * 64,
                          num_examples=1, owner_key=owner, recipient_public=recipient.public_key())

    seal_time = best_of(3, seal)
    sealed = seal()
    blob = workdir / "delta.sealed"
    sealed.write(blob)
    expected = ExpectedContext("bench", 1, "o", key_id(owner.public_key()), "0" * 64,
                               x25519_key_id(recipient.public_key()))
    open_time = best_of(3, lambda: open_sealed(blob, recipient_private=recipient, sender_public=owner.public_key(),
                                               expected=expected, max_plaintext_bytes=size))
    # The coordinator's receive path, as intake runs it: the parts arrive as bytes, one per STREAM chunk.
    parts: list[bytes] = [bytes(chunk) for chunk in sealed.chunks()]
    parts.append(Trailer(sealed.trailer))

    def receive() -> None:
        verify_preamble(sealed.header_json, sealed.wrapped_key, sealed.signature, owner.public_key())
        header = SealedHeader.from_bytes(sealed.header_json)
        unsealer = Unsealer(header, sealed.header_json, sealed.wrapped_key, recipient)
        with open(workdir / "upload.tmp", "wb") as sink:
            sink.write(sealed.preamble())
            trailer = receive_stream(unsealer, parts, sink, cap=1 << 40)
            unsealer.finish(trailer, owner.public_key())
            sink.write(trailer)

    received_time = best_of(3, receive)
    return aead_enc, seal_time, aead_dec, open_time, received_time


def big_bundle(workdir: Path, key: Ed25519PrivateKey, size: int) -> Path:
    """A real signed bundle (tiny GPT-2) padded with ``size`` bytes of weights-like data, re-signed."""
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from coordinator.bundles import build_bundle
    from emulator.loading import embedded_model_path
    from emulator.split import SplitConfig
    from protos.bundle import MANIFEST, sign_bundle
    from protos.manifests import BundleManifest

    out = workdir / "bundle"
    full = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                                      bos_token_id=1, eos_token_id=2))
    build_bundle(full, str(embedded_model_path()), "bench", SplitConfig(1, 1, 1), out, key)
    manifest = BundleManifest.from_json(json.loads((out / MANIFEST).read_text()))
    padding = torch.frombuffer(bytearray(os.urandom(size)), dtype=torch.uint8)
    save_file({"padding": padding}, str(out / "emulator" / "padding.safetensors"))  # a bundle holds only safetensors
    sign_bundle(out, manifest, key)  # re-signed: the manifest now lists the padding too
    return out


def download_bench(size: int, workdir: Path) -> tuple[int, float, float]:
    from client.transport import CoordinatorClient
    from coordinator.jobs import bundle_tar, create_job
    from coordinator.server import start_server

    key = Ed25519PrivateKey.generate()
    bundle = big_bundle(workdir, key, size)
    server = start_server(workdir / "state", signing_key=key, insecure=True)
    try:
        create_job(server.storage, "bench", bundle, key.public_key())
        owner = Ed25519PrivateKey.generate()
        server.store.add_owner("bench-owner", owner.public_key(), approved=True)
        server.store.enroll("bench", "bench-owner")
        tar = bundle_tar(server.storage, "bench")
        copy_time = best_of(3, lambda: shutil.copyfile(tar, workdir / "copy.tar"))
        with CoordinatorClient(server.address, coordinator_key=key.public_key(), owner_key=owner,
                               owner_id="bench-owner", insecure=True) as client:
            job = client.get_job("bench")

            def download() -> None:
                dest = workdir / "dl"
                shutil.rmtree(dest, ignore_errors=True)
                client.fetch_verified_tar(job, dest)

            download_time = best_of(3, download)
        return tar.stat().st_size, copy_time, download_time
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=100, help="delta and bundle size in MB")
    args = parser.parse_args()
    size = args.mb * 1_000_000
    workdir = Path(tempfile.mkdtemp(prefix="offsite-wire-bench-"))
    try:
        aead_enc, seal_time, aead_dec, open_time, received_time = seal_bench(size, workdir)
        tar_size, copy_time, download_time = download_bench(size, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    mbps = lambda n, t: n / t / 1e6  # noqa: E731
    rows = [("raw AEAD encrypt (ChaCha20-Poly1305, 1 MiB chunks)", mbps(size, aead_enc)),
            ("seal_delta v2 (AEAD + sign preamble and chunk tags)", mbps(size, seal_time)),
            ("raw AEAD decrypt", mbps(size, aead_dec)),
            ("open_sealed v2 (read + AEAD + verify both signatures)", mbps(size, open_time)),
            ("coordinator receive path (write temp file + AEAD + verify)", mbps(size, received_time)),
            ("local file copy (bundle tar)", mbps(tar_size, copy_time)),
            ("gRPC loopback download (whole-tar sha256 once, as written)", mbps(tar_size, download_time))]
    width = max(len(name) for name, _ in rows)
    print(f"{'operation':<{width}}  MB/s")
    for name, value in rows:
        print(f"{name:<{width}}  {value:8.0f}")
    seal_ratio, open_ratio, receive_ratio = aead_enc / seal_time, aead_dec / open_time, aead_dec / received_time
    print(f"seal ratio {seal_ratio:.2f}, open ratio {open_ratio:.2f}, receive ratio {receive_ratio:.2f} of raw AEAD; "
          f"sizes: delta {size:,} B, bundle tar {tar_size:,} B")
    print(f"seal_vs_aead={min(seal_ratio, open_ratio):.2f}")
    print(f"receive_vs_aead={receive_ratio:.2f}")
    print(f"download_vs_copy={copy_time / download_time:.2f}")


if __name__ == "__main__":
    main()
