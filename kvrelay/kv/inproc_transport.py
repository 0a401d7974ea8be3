"""In-process KV transfer: engines in one process (tests, the simulator, a single-process
server) hand runs over without sockets or copies.

Owns `InProcessHub` (address -> receiver, one per process or test) and `InProcessTransport`.
Runs go through the same header, length and checksum checks as on the wire, so a bug that
would corrupt a TCP transfer is caught here too. Delivery is thread-safe: a sender on another
event loop (an engine thread) puts into the receiver's loop. Imports only `kv.transfer`,
`kv.send_stream` and `errors`; no torch.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging

from kvrelay.errors import TransferError
from kvrelay.kv.send_stream import PipelinedSendStream
from kvrelay.kv.transfer import (
    DEFAULT_TIMEOUT_S,
    AbortHeader,
    BlockRun,
    EndHeader,
    Header,
    Inbox,
    KVLayout,
    Transport,
    check_payload,
    check_run_header,
)

logger = logging.getLogger(__name__)


class InProcessHub:
    """Names the in-process receivers: `inproc://<n>` -> transport."""

    def __init__(self) -> None:
        self._receivers: dict[str, InProcessTransport] = {}
        self._ids = itertools.count()

    def register(self, transport: InProcessTransport) -> str:
        address = f"inproc://{next(self._ids)}"
        self._receivers[address] = transport
        return address

    def unregister(self, address: str) -> None:
        self._receivers.pop(address, None)

    def lookup(self, address: str) -> InProcessTransport:
        receiver = self._receivers.get(address)
        if receiver is None:
            raise TransferError(f"no KV receiver at {address}")
        return receiver


class InProcessTransport:
    """`Transport` within one process; payloads are passed by reference, never copied."""

    def __init__(self, hub: InProcessHub) -> None:
        self.hub = hub
        self.address = ""
        self._inboxes: dict[str, Inbox] = {}

    async def start(self) -> str:
        if not self.address:
            self.address = self.hub.register(self)
        return self.address

    def expect(self, request_id: str, layout: KVLayout) -> Inbox:
        if request_id in self._inboxes:
            raise TransferError(f"request {request_id}: a transfer is already expected")
        inbox = Inbox(request_id, layout)
        self._inboxes[request_id] = inbox
        inbox.on_close(lambda: self._inboxes.pop(request_id, None))
        return inbox

    async def open(
        self,
        address: str,
        request_id: str,
        layout: KVLayout,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> InProcessSendStream:
        return InProcessSendStream(self.hub.lookup(address), request_id, layout, timeout_s)

    async def close(self) -> None:
        self.hub.unregister(self.address)
        for inbox in list(self._inboxes.values()):
            inbox.put_error(TransferError(f"KV receiver {self.address} closed"))
            inbox.close()

    def deliver(self, header: Header, sent: BlockRun | None) -> None:
        """Check a run as a receiver on the wire would, then hand it to the inbox (the same
        payload: its consumer's `release()` returns the sender's buffer)."""
        inbox = self._inboxes.get(header.request_id)
        if inbox is None:
            raise TransferError(f"request {header.request_id}: no transfer expected here")
        if isinstance(header, EndHeader):
            inbox.put_end(header.num_blocks)
        elif isinstance(header, AbortHeader):
            inbox.put_error(TransferError(f"sender aborted: {header.reason}"))
        else:
            payload = b"" if sent is None else sent.payload
            try:
                check_run_header(header, inbox.layout, inbox.next_block)
                check_payload(header, payload)
            except TransferError as exc:
                inbox.put_error(exc)
                raise
            assert sent is not None
            inbox.put_run(dataclasses.replace(sent, request_id=header.request_id))


def _is_transport(transport: InProcessTransport) -> Transport:  # mypy checks the protocol
    return transport


class InProcessSendStream(PipelinedSendStream):
    def __init__(
        self, receiver: InProcessTransport, request_id: str, layout: KVLayout, timeout_s: float
    ) -> None:
        super().__init__(request_id, layout, timeout_s)
        self._receiver = receiver

    async def _write(self, header: Header, run: BlockRun | None) -> None:
        self._receiver.deliver(header, run)

    async def _close(self) -> TransferError | None:
        return None
