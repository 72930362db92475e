"""Collect concurrent single-item calls into one call on a list (the retriever's query batcher).

Hand-written rather than ``ray.serve.batch``, which Ray 2.60 gives two behaviours that cost
retrieval latency: it always lingers ``batch_wait_timeout_s`` after the first item, so a lone
query waits the whole window for company that never comes (10 ms of a ~17 ms dense retrieve at
one client, measured), and it forms the next batch *while* one runs (its concurrency semaphore is
taken after the batch is cut), so under load calls arriving during a running batch are split into
window-sized batches instead of going together. :class:`MicroBatcher` does what an inference
server's dynamic batcher does:

* calls that arrive while a batch runs wait for it and go in the next batch, up to the size limit;
* an idle batcher lingers ``wait_timeout_s`` for company only when the previous batch held more
  than one call (there is concurrency to wait for), and only until as many calls as that batch held
  have arrived; after a lone call, the next starts at once.

One implementation everywhere (replicas, tests, ``ragtune bench``, the CLI), built per instance:
a class-level decorator's queue would be shared by every instance and bound to one event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["MicroBatcher"]

BatchFn = Callable[[list[Any]], Awaitable[list[Any]]]


class MicroBatcher:
    """``await batcher(item)`` → ``fn([... item ...])[i]``: one batch at a time, collected while busy.

    State is only a list of pending futures, a timer and the last batch's size, so one instance
    works across event loops as long as a loop does not end with calls still pending.
    """

    def __init__(self, fn: BatchFn, max_batch_size: int, wait_timeout_s: float):
        self._fn, self._max, self._wait = fn, max_batch_size, wait_timeout_s
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running = False
        self._last_size = max_batch_size  # no history yet: linger, as under load

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        if self._running:
            pass  # picked up when the running batch finishes
        elif len(self._pending) >= self._max or 1 < self._last_size <= len(self._pending):
            # Full, or as many as the previous batch held (closed-loop clients coming back together):
            # lingering longer only idles the batcher.
            self._start()
        elif self._timer is None:
            # A lone call after a lone call does not wait for company; the next loop turn still
            # takes whatever arrived with it.
            self._timer = loop.call_later(self._wait if self._last_size > 1 else 0, self._start)
        return await future

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Calls cancelled, or left behind by an event loop that has ended, are not worth running.
        self._pending = [(i, f) for i, f in self._pending if not f.done() and not f.get_loop().is_closed()]
        if self._running or not self._pending:
            return
        batch, self._pending = self._pending[: self._max], self._pending[self._max :]
        self._running, self._last_size = True, len(batch)
        asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = await self._fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} items")
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._running = False
            # Whatever arrived meanwhile has waited at least one batch: run it now.
            self._start()
