"""The requests a prediction server holds at once: the memory of their bodies, and their fate when it stops."""

import asyncio
import contextlib
import json

from absl import logging

from trainer.serving.prediction_requests import RequestError


class BodyBudget:
    """A cap on the bytes of request bodies held at once, so that many large uploads cannot exhaust memory."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    @contextlib.contextmanager
    def hold(self):
        """A request's share: `grow_to(size)` as its body arrives (503 past the cap); it is given back on exit."""
        holding = _Holding(self)
        try:
            yield holding
        finally:
            self.held -= holding.size

    def _take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise RequestError(503, f"the server holds {self.held:,} bytes of request bodies, near its "
                                    f"--max_inflight_bytes={self.limit:,}; retry shortly.")
        self.held += size


class _Holding:
    def __init__(self, budget: BodyBudget):
        self.budget, self.size = budget, 0

    def grow_to(self, size: int) -> None:
        if size > self.size:
            self.budget._take(size - self.size)
            self.size = size


class ShutdownGrace:
    """Knows the requests being answered. Once the server is told to stop (`begin`), those still running after
    `grace_seconds` are cancelled and answered 503, so a client never waits on a server that is going away."""

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.running: dict[asyncio.Task, list[bool]] = {}  # Each request's task: [whether its answer has started].
        self.cut_off: set[asyncio.Task] = set()
        self.stopping, self.answered, self.cut_off_count = False, 0, 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def begin(self) -> None:
        """Starts the grace period; safe to call from a signal handler (it runs on the loop's thread)."""
        if self.loop is not None and not self.stopping:
            self.loop.call_soon_threadsafe(self._start_grace)

    def _start_grace(self) -> None:
        self.stopping = True
        if self.running:
            logging.info("Stopping: answering the %d requests in flight, for --shutdown_grace_s=%g at most.",
                         len(self.running), self.grace_seconds)
        self.loop.call_later(self.grace_seconds, self._cut_off)

    def _cut_off(self) -> None:
        for task in list(self.running):
            self.cut_off.add(task)
            task.cancel()

    def summary(self) -> str:
        if not self.cut_off_count:
            return f"answered all {self.answered} requests in flight" if self.answered else "no request was in flight"
        return (f"answered {self.answered} requests in flight; cut off {self.cut_off_count} still running after "
                f"--shutdown_grace_s={self.grace_seconds:g} with a 503")


class ShutdownGraceMiddleware:
    """ASGI middleware that registers each HTTP request with a ShutdownGrace and answers a cut-off one with 503."""

    def __init__(self, app, grace: ShutdownGrace):
        self.app, self.grace = app, grace

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task, started = asyncio.current_task(), [False]
        grace = self.grace
        grace.running[task] = started

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            if task not in grace.cut_off:
                raise
            task.uncancel()
            if not started[0]:
                await _send_json(send, 503, {"error": "the server is shutting down and could not finish this request "
                                                      f"within --shutdown_grace_s={grace.grace_seconds:g}; retry "
                                                      "(another replica will answer)."})
        finally:
            del grace.running[task]
            if task in grace.cut_off:
                grace.cut_off.discard(task)
                grace.cut_off_count += 1
            elif grace.stopping:
                grace.answered += 1


async def _send_json(send, status: int, value: dict) -> None:
    body = json.dumps(value).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
