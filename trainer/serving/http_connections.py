"""uvicorn's HTTP protocol with the limits it lacks: a deadline for a request's head, a cap on its size, and a cap
on open connections that keeps the server answering when slow clients take every slot."""

import asyncio
import json

from absl import logging
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Request line and headers together; h11 (uvicorn's other parser) stops at 16 KiB, browsers send a few KiB.
MAX_HEAD_BYTES = 64 * 1024


def raw_json_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP response with a JSON error, for answers given before (or instead of) the application."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class LimitedHttpProtocol(HttpToolsProtocol):
    """One connection. Its request's line and headers must arrive within `header_timeout` seconds of the moment it
    started waiting for them (connection open, or the last answer sent), however slowly the bytes trickle in.

    At most `max_connections` connections are open: a new one beyond the cap closes the connection that has waited
    longest for a request's head (an idle keep-alive or a slow client), else the one that has waited longest for a
    request's body, so the health route stays reachable under slow clients; when every open connection has a whole
    request being answered, the new one is answered 503 and closed.
    """

    def __init__(self, *args, header_timeout: float, max_connections: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self.waiting_since: float | None = None  # Loop time since it waits for a request's head; None meanwhile.
        self.body_since: float | None = None  # Loop time since it waits for the rest of a request's body.
        self.head_bytes = 0
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        full = len(self.connections) >= self.max_connections and not self._evict_slowest()
        super().connection_made(transport)
        if full:
            logging.log_every_n_seconds(logging.WARNING, "Refusing connections: all %d (--max_connections) are busy "
                                        "with requests.", 10, self.max_connections)
            self._close_with(503, "Service Unavailable", f"the server has --max_connections={self.max_connections} "
                             "connections busy with requests; retry shortly.")
            return
        self._wait_for_head()

    def _evict_slowest(self) -> bool:
        waiting = [connection for connection in self.connections if isinstance(connection, LimitedHttpProtocol)
                   and connection.eviction_order() is not None and not connection.transport.is_closing()]
        if not waiting:
            return False
        slowest = min(waiting, key=lambda connection: connection.eviction_order())
        slowest._close_with(503, "Service Unavailable", "closed to make room for another connection: this one sent "
                            "no complete request for the longest time.")
        slowest.connections.discard(slowest)  # Counted out now; its transport closes on the next loop turn.
        return True

    def eviction_order(self) -> tuple[int, float] | None:
        """Which connection a new one pushes out first (the smallest): waiting for a head, then for a body, the
        longest waiting first; None for one whose request is being answered."""
        if self.waiting_since is not None:
            return 0, self.waiting_since
        if self.body_since is not None:
            return 1, self.body_since
        return None

    def _wait_for_head(self) -> None:
        self.waiting_since, self.head_bytes = self.loop.time(), 0
        self._cancel_header_timer()
        self.header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timed_out(self) -> None:
        self.header_timer = None
        if self.waiting_since is not None and not self.transport.is_closing():
            self._close_with(408, "Request Timeout", f"the request's line and headers did not arrive within "
                             f"--header_timeout_s={self.header_timeout:g}.")

    def _close_with(self, status: int, reason: str, message: str) -> None:
        self.waiting_since = self.body_since = None
        self._cancel_header_timer()
        # Only a connection between requests is answered: one whose request is being answered is just closed.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(raw_json_response(status, reason, message))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.waiting_since is not None and not self.transport.is_closing():
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._close_with(431, "Request Header Fields Too Large", f"the request's line and headers are over "
                                 f"{MAX_HEAD_BYTES:,} bytes.")

    def on_headers_complete(self) -> None:
        self.waiting_since, self.body_since = None, self.loop.time()
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.body_since = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # Now idle, waiting for the next request on this connection.
            self._wait_for_head()

    def connection_lost(self, exc) -> None:
        self.waiting_since = self.body_since = None
        self._cancel_header_timer()
        super().connection_lost(exc)
