"""The coordinator's domain errors; the gRPC layer maps each class to one status code."""

from __future__ import annotations


class CoordinatorError(Exception):
    """Base class: the message names what was wrong."""


class NotFoundError(CoordinatorError):
    pass


class UnknownOwnerError(CoordinatorError):
    pass


class OwnerNotApprovedError(CoordinatorError):
    pass


class InvalidTransitionError(CoordinatorError):
    """A round or job is not in the state the request needs (a CLOSED round, say)."""


class SlotTakenError(CoordinatorError):
    """The (job, round, owner) slot or the upload id already holds different bytes."""


class UploadTooLargeError(CoordinatorError):
    pass


class MalformedRequestError(CoordinatorError):
    pass


class OutOfRangeError(CoordinatorError):
    pass
