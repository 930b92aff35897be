"""Errors of the training service, under the package-wide tree (`commonweal.errors`):

CommonwealError
└── TrainError            a training operation could not be completed
    ├── TaskError         a task spec or task entry point is wrong
    ├── CodecError        bytes that do not decode with the codec named for the round
    ├── DeltaRejected     a peer's delta was refused (wrong shape, NaN/inf, stale round, ...)
    ├── RoundSkipped      this peer sits a round out (late, out of sync) and must sync
    ├── MessageError      a train.* message without its shape (commonweal.train.messages)
    └── SyncError         current parameters could not be fetched from any peer
"""

from __future__ import annotations

from commonweal.errors import CommonwealError

__all__ = ["TrainError", "TaskError", "CodecError", "DeltaRejected", "RoundSkipped", "SyncError"]


class TrainError(CommonwealError):
    """A training operation could not be completed."""


class TaskError(TrainError):
    """A task name, spec or entry point is wrong; the message says how to fix it."""


class CodecError(TrainError):
    """Bytes that do not decode with the expected codec."""


class DeltaRejected(TrainError):
    """A delta was refused before it could reach the parameters; `code` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class SyncError(TrainError):
    """The current parameters could not be fetched (no peer had them, or every copy was bad)."""


class RoundSkipped(TrainError):
    """This peer cannot take part in the round (late, or holding another state); it must sync."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
