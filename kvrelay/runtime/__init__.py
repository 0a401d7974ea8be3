"""Runtime: discovery, request plane and event plane behind one interface (`base.Runtime`),
with an `embedded` backend (one host, loopback, no external service) and a `nats` backend.

Owns: `make_runtime(url)`, which picks the backend from the URL scheme. Layer L1: imports
only L0; must not import the engine, worker or frontend. NATS is imported only here.
"""

from __future__ import annotations

from kvrelay.errors import TransportError
from kvrelay.runtime.base import Runtime


def make_runtime(url: str, name: str = "kvrelay") -> Runtime:
    """`embedded://host:port` (an EmbeddedHub) or `nats://host:port` (a NATS server)."""
    if url.startswith("embedded://"):
        from kvrelay.runtime.embedded import EmbeddedRuntime

        return EmbeddedRuntime(url)
    if url.startswith(("nats://", "tls://")):
        from kvrelay.runtime.nats_backend import NatsRuntime

        return NatsRuntime(url, name=name)
    raise TransportError(
        f"unknown runtime URL {url!r}; use embedded://host:port or nats://host:port"
    )


__all__ = ["Runtime", "make_runtime"]
