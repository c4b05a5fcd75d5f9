"""Dynamic batching for the prediction server: concurrent requests' images go through the model in one call."""

import asyncio
import collections
import concurrent.futures
import dataclasses
import time
from typing import Callable

import numpy as np

# Called after each model call with (images in the batch, seconds the call took).
BatchObserver = Callable[[int, float], None]


@dataclasses.dataclass
class _Pending:
    image: np.ndarray
    future: asyncio.Future


class DynamicBatcher:
    """Merges the images of concurrent requests into batches of up to `max_batch_size`, as TF Serving's batching does.

    A batch starts with the oldest waiting image and waits at most `timeout_seconds` for more to fill it; a full
    batch goes at once. While the model computes one batch the next one gathers, so under load batches fill without
    waiting. The model runs on one thread of its own, never on the event loop's thread, which keeps taking requests.
    """

    def __init__(self, function: Callable[[np.ndarray], np.ndarray], *, max_batch_size: int, timeout_seconds: float,
                 observe: BatchObserver | None = None):
        self.function, self.max_batch_size, self.timeout_seconds = function, max_batch_size, timeout_seconds
        self.observe = observe or (lambda size, seconds: None)
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Starts gathering batches; call it on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._gather_batches(), name="dynamic-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def predict(self, images: np.ndarray) -> np.ndarray:
        """The model's outputs for `images` [N, ...], computed in batches shared with other requests."""
        loop = asyncio.get_running_loop()
        pending = [_Pending(image, loop.create_future()) for image in images]
        self._waiting.extend(pending)
        self._arrived.set()
        return np.stack(await asyncio.gather(*(item.future for item in pending)))

    async def _gather_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self.timeout_seconds
            while len(self._waiting) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch = [self._waiting.popleft() for _ in range(min(self.max_batch_size, len(self._waiting)))]
            await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        # A request whose client went away has cancelled its futures; its images are not computed.
        batch = [item for item in batch if not item.future.done()]
        if not batch:
            return
        start = time.perf_counter()
        try:
            images = np.stack([item.image for item in batch])
            outputs = await loop.run_in_executor(self._executor, self.function, images)
        except Exception as error:  # The requests in the batch get the model's error; the batcher goes on.
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        self.observe(len(batch), time.perf_counter() - start)
        for item, output in zip(batch, outputs):
            if not item.future.done():
                item.future.set_result(output)


class UnbatchedModel:
    """The same interface without batching: each request is its own model call, on a pool of `threads` threads
    (several calls run at once, as in a server without batching)."""

    def __init__(self, function: Callable[[np.ndarray], np.ndarray], *, threads: int,
                 observe: BatchObserver | None = None):
        self.function = function
        self.observe = observe or (lambda size, seconds: None)
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="model")

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        self._executor.shutdown(wait=True)

    async def predict(self, images: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self.function, images)
        self.observe(len(images), time.perf_counter() - start)
        return outputs
