"""Exception hierarchy for everything a user or a peer can cause.

Owns: the typed errors raised across the package. Imports nothing from kvrelay.
Internal invariants use `assert`; anything caused by input raises one of these.
"""

from __future__ import annotations


class KvRelayError(Exception):
    """Base class of every error kvrelay raises on purpose."""


class InvalidRequestError(KvRelayError, ValueError):
    """A request (prompt or parameters) that cannot be served as given."""


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling parameter outside its valid range."""


class PromptTooLongError(InvalidRequestError):
    """The prompt plus the requested output does not fit the model's context."""


class ModelLoadError(KvRelayError):
    """A model path, file or checkpoint that cannot be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path or name does not exist."""


class CorruptModelError(ModelLoadError):
    """The model file exists but is truncated, malformed or unsupported."""


class OutOfKVMemoryError(KvRelayError):
    """A single request needs more KV blocks than the whole cache holds."""


class TransportError(KvRelayError):
    """The runtime could not deliver a message or lost a peer."""


class PeerUnavailableError(TransportError):
    """The peer is unreachable, closed the connection or stopped answering mid-stream."""


class RemoteError(TransportError):
    """The peer's handler failed; the message says why."""


class ServiceUnavailableError(KvRelayError):
    """No worker can take the request now (none registered, all saturated or draining)."""


class TransferError(KvRelayError):
    """A KV block transfer failed: its blocks must not be imported (recompute them instead)."""


class CorruptTransferError(TransferError):
    """A transferred run is truncated, mislabelled, or fails its length or checksum check."""


class TransferTimeoutError(TransferError):
    """The peer of a KV transfer stopped sending (or receiving) for longer than the timeout."""
