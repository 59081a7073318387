"""The one place where domain types and protobuf messages meet."""

from __future__ import annotations

from collections.abc import Iterator

from protos.messages import AggregatedRoundInfo, BundleChunkInfo, OpenedRoundInfo, RoundStatusInfo, SignedDocument
from protos.offsite.v1 import coordinator_pb2 as pb
from protos.sealed import SealedDelta, Trailer


def signed_manifest_to_pb(doc: SignedDocument) -> pb.SignedJobManifest:
    return pb.SignedJobManifest(manifest_json=doc.payload, signature=doc.signature)


def signed_manifest_from_pb(message: pb.SignedJobManifest) -> SignedDocument:
    return SignedDocument(bytes(message.manifest_json), bytes(message.signature))


def receipt_to_pb(doc: SignedDocument, already_accepted: bool) -> pb.SignedReceipt:
    return pb.SignedReceipt(receipt_json=doc.payload, signature=doc.signature, already_accepted=already_accepted)


def receipt_from_pb(message: pb.SignedReceipt) -> tuple[SignedDocument, bool]:
    return SignedDocument(bytes(message.receipt_json), bytes(message.signature)), bool(message.already_accepted)


def round_status_to_pb(status: RoundStatusInfo) -> pb.RoundStatus:
    return pb.RoundStatus(job_id=status.job_id, round=status.round, state=status.state, reason=status.reason,
                          accepted_uploads=status.accepted_uploads, total_examples=status.total_examples)


def round_status_from_pb(message: pb.RoundStatus) -> RoundStatusInfo:
    return RoundStatusInfo(message.job_id, message.round, message.state, message.reason, message.accepted_uploads,
                           message.total_examples)


def opened_round_to_pb(opened: OpenedRoundInfo) -> pb.OpenedRound:
    return pb.OpenedRound(state=opened.state, done=opened.done, message_json=opened.message,
                          signature=opened.signature, adapter=opened.adapter)


def opened_round_from_pb(message: pb.OpenedRound) -> OpenedRoundInfo:
    return OpenedRoundInfo(message.state, bool(message.done), bytes(message.message_json), bytes(message.signature),
                           bytes(message.adapter))


def aggregated_round_to_pb(result: AggregatedRoundInfo) -> pb.AggregatedRound:
    return pb.AggregatedRound(record_json=result.record_json, adapter=result.adapter,
                              adapter_sha256=result.adapter_sha256)


def aggregated_round_from_pb(message: pb.AggregatedRound) -> AggregatedRoundInfo:
    return AggregatedRoundInfo(bytes(message.record_json), bytes(message.adapter), message.adapter_sha256)


def bundle_chunk_to_pb(chunk: BundleChunkInfo) -> pb.BundleChunk:
    return pb.BundleChunk(offset=chunk.offset, data=chunk.data, total_size=chunk.total_size)


def bundle_chunk_from_pb(message: pb.BundleChunk) -> BundleChunkInfo:
    return BundleChunkInfo(message.offset, message.data, message.total_size)


def preamble_to_pb(header_json: bytes, wrapped_key: bytes, signature: bytes) -> pb.SubmitDeltaRequest:
    return pb.SubmitDeltaRequest(
        preamble=pb.SealedPreamble(header_json=header_json, wrapped_key=wrapped_key, signature=signature))


def preamble_from_pb(message: pb.SubmitDeltaRequest) -> tuple[bytes, bytes, bytes] | None:
    """``(header_json, wrapped_key, signature)``, or None when the message is not a preamble."""
    if message.WhichOneof("part") != "preamble":
        return None
    p = message.preamble
    return bytes(p.header_json), bytes(p.wrapped_key), bytes(p.signature)


def trailer_to_pb(trailer: bytes) -> pb.SubmitDeltaRequest:
    return pb.SubmitDeltaRequest(trailer=pb.SealedTrailer(signature=trailer))


def chunk_from_pb(message: pb.SubmitDeltaRequest) -> bytes | None:
    """A part after the preamble: ciphertext ``bytes``, or the trailer as :class:`protos.sealed.Trailer`; None for
    anything else."""
    part = message.WhichOneof("part")
    if part == "chunk":
        return message.chunk
    if part == "trailer":
        return Trailer(message.trailer.signature)
    return None


def sealed_to_requests(sealed: SealedDelta, *, stop_after: int | None = None) -> Iterator[pb.SubmitDeltaRequest]:
    """The preamble, one message per STREAM chunk, the trailer (``stop_after`` chunks at most and no trailer, to
    test disconnects)."""
    yield preamble_to_pb(sealed.header_json, sealed.wrapped_key, sealed.signature)
    for index, chunk in enumerate(sealed.chunks()):
        if stop_after is not None and index >= stop_after:
            return
        yield pb.SubmitDeltaRequest(chunk=bytes(chunk))
    yield trailer_to_pb(sealed.trailer)
