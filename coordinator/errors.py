"""The coordinator's domain errors; the gRPC layer maps each class to one status code."""

from __future__ import annotations

from protos.errors import FieldError


class CoordinatorError(Exception):
    """Root of every error the coordinator package raises on purpose: the message names what was wrong."""


class InvalidSettingError(CoordinatorError, FieldError):
    """A coordinator setting (simulate, federation, job, id) is invalid; the message marks fields as ``{field}``."""


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


class TooManyExamplesError(CoordinatorError):
    """An upload claims more training examples (its weight in FedAvg) than the owner's cap in the job."""


class AuthenticationError(CoordinatorError):
    """A request could not be authenticated. The message is for the server's log only: callers get a generic
    answer, so a stranger learns neither which owners or jobs exist nor which key was expected."""


class NotEnrolledError(CoordinatorError):
    """An authenticated owner asked about a job it is not enrolled in (or that does not exist: the answer is the
    same, so owners cannot probe for jobs)."""
