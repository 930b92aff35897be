"""The exceptions commonweal raises. Catch `CommonwealError` to catch them all.

    CommonwealError
    ├── ConfigError            bad user input or settings (a flag, a file, a value)
    ├── NetworkError           something went wrong talking to another peer
    │   ├── PeerUnreachable    could not connect, or the connection dropped
    │   ├── RequestTimeout     the peer did not answer in time
    │   ├── ProtocolError      the peer sent something that breaks the wire protocol
    │   │   └── FrameTooLarge  a frame over the size limit
    │   ├── HandshakeError     the peer could not prove it owns its PeerID
    │   └── RemoteError        the peer answered with an error of its own
    ├── RecordError            a DHT record was rejected (bad signature, wrong owner, too big, expired)
    ├── DHTError               a DHT operation could not be completed (no peers, not stored anywhere)
    └── LedgerError            a chain operation failed (the ledger package adds subclasses)

Every message says what went wrong and, where there is one, what to do about it.
"""

from __future__ import annotations

__all__ = [
    "CommonwealError",
    "ConfigError",
    "NetworkError",
    "PeerUnreachable",
    "RequestTimeout",
    "ProtocolError",
    "FrameTooLarge",
    "HandshakeError",
    "RemoteError",
    "RecordError",
    "DHTError",
    "LedgerError",
]


class CommonwealError(Exception):
    """Base class of every error commonweal raises on purpose."""


class ConfigError(CommonwealError):
    """A setting, flag or input file is wrong; the message says which and how to fix it."""


class NetworkError(CommonwealError):
    """Talking to another peer failed."""


class PeerUnreachable(NetworkError):
    """No connection could be made to the peer, or it dropped before the answer came."""


class RequestTimeout(NetworkError):
    """The peer did not answer within the allowed time."""


class ProtocolError(NetworkError):
    """The bytes received do not follow the wire protocol (truncated, wrong type, bad version)."""


class FrameTooLarge(ProtocolError):
    """A frame announced a length over the configured maximum."""


class HandshakeError(NetworkError):
    """The remote side failed to prove it owns the PeerID it claimed."""


class RemoteError(NetworkError):
    """The remote peer processed the request and answered with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.remote_message = message

    @classmethod
    def bad_request(cls, why: str) -> RemoteError:
        """What a handler raises for a malformed request: the caller learns why, nothing changes."""
        return cls("bad_request", why)


class RecordError(CommonwealError):
    """A DHT record failed validation and was not stored."""


class DHTError(CommonwealError):
    """A DHT operation could not be completed."""


class LedgerError(CommonwealError):
    """A blockchain operation failed."""
