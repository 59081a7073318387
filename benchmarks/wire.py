"""Wire throughput: sealing/unsealing a 100 MB delta vs raw AEAD, and bundle download vs a local file copy.

Run: ``PYTHONPATH=. python benchmarks/wire.py [--mb 100]``. The last two lines are ``seal_vs_aead=<ratio>`` (the
lower of the sealing and unsealing ratios) and ``download_vs_copy=<ratio>``.
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
from protos.sealed import DEFAULT_CHUNK_SIZE, TAG_BYTES, ExpectedContext, ciphertext_digest, open_sealed, seal_delta

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
    payload = os.urandom(size)
    owner, recipient = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    encrypt, decrypt = raw_aead(payload, DEFAULT_CHUNK_SIZE)
    aead_enc, aead_dec = best_of(3, encrypt), best_of(3, decrypt)

    def seal() -> object:
        return seal_delta(payload, job_id="bench", round=1, owner_id="o", upload_id="u", adapter_spec_digest="0" * 64,
                          num_examples=1, owner_key=owner, recipient_public=recipient.public_key())

    seal_time = best_of(3, seal)
    blob = workdir / "delta.sealed"
    seal().write(blob)  # type: ignore[attr-defined]
    expected = ExpectedContext("bench", 1, "o", key_id(owner.public_key()), "0" * 64,
                               x25519_key_id(recipient.public_key()))
    open_time = best_of(3, lambda: open_sealed(blob, recipient_private=recipient, sender_public=owner.public_key(),
                                               expected=expected, max_plaintext_bytes=size))
    # The server hashes the ciphertext while it arrives and passes the digest in: its unsealing cost.
    with open(blob, "rb") as stream:
        digest = ciphertext_digest(stream, len(seal().preamble()))  # type: ignore[attr-defined]
    received_time = best_of(3, lambda: open_sealed(blob, recipient_private=recipient,
                                                   sender_public=owner.public_key(), expected=expected,
                                                   max_plaintext_bytes=size, ciphertext_sha256=digest))
    return aead_enc, seal_time, aead_dec, open_time, received_time


def big_bundle(workdir: Path, key: Ed25519PrivateKey, size: int) -> Path:
    """A real signed bundle (tiny GPT-2) padded with ``size`` bytes of weights-like data, re-signed."""
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
    (out / "emulator" / "padding.bin").write_bytes(os.urandom(size))
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
        tar = bundle_tar(server.storage, "bench")
        copy_time = best_of(3, lambda: shutil.copyfile(tar, workdir / "copy.tar"))
        with CoordinatorClient(server.address, coordinator_key=key.public_key(), insecure=True) as client:
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
            ("seal_delta (sha256 plaintext + AEAD + sha256 ciphertext + sign)", mbps(size, seal_time)),
            ("raw AEAD decrypt", mbps(size, aead_dec)),
            ("open_sealed (read + sha256 ciphertext + verify + AEAD + sha256 plaintext)", mbps(size, open_time)),
            ("open_sealed, ciphertext digest taken during receive (server path)", mbps(size, received_time)),
            ("local file copy (bundle tar)", mbps(tar_size, copy_time)),
            ("gRPC loopback download (chunk + whole sha256)", mbps(tar_size, download_time))]
    width = max(len(name) for name, _ in rows)
    print(f"{'operation':<{width}}  MB/s")
    for name, value in rows:
        print(f"{name:<{width}}  {value:8.0f}")
    seal_ratio, open_ratio = aead_enc / seal_time, aead_dec / open_time
    print(f"seal ratio {seal_ratio:.2f}, unseal ratio {open_ratio:.2f} (server path {aead_dec / received_time:.2f}) "
          f"of raw AEAD; sizes: delta {size:,} B, "
          f"bundle tar {tar_size:,} B")
    print(f"seal_vs_aead={min(seal_ratio, open_ratio):.2f}")
    print(f"download_vs_copy={copy_time / download_time:.2f}")


if __name__ == "__main__":
    main()
