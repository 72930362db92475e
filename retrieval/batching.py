"""Collect concurrent single-item calls into one call on a list: ``ray.serve.batch`` or a fallback.

Inside a Ray Serve replica this is ``serve.batch``. Outside one (unit tests, ``ragtune bench``,
the CLI) Ray 2.60's ``serve.batch`` raises on first use — its queue calls
``serve.get_replica_context()`` to check ``max_ongoing_requests`` — so a small asyncio batcher
with the same knobs and behaviour (one batch at a time; a batch starts when full or when the
wait timeout passes) is used instead.

The batcher is built per instance, not with ``@serve.batch`` on the class: the decorator's
queue is shared by every instance of the class (a batch runs with the first request's
``self``) and bound to the first event loop that used it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["MicroBatcher", "in_serve_replica", "make_batcher"]

BatchFn = Callable[[list[Any]], Awaitable[list[Any]]]


def in_serve_replica() -> bool:
    """True when running inside a Ray Serve replica (where ``serve.batch`` works)."""
    serve = sys.modules.get("ray.serve")
    if serve is None:
        return False  # a replica imports Ray Serve long before it builds us; don't pay ~2 s to ask
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        return False
    return True


def make_batcher(fn: BatchFn, max_batch_size: int, wait_timeout_s: float) -> Callable[[Any], Awaitable[Any]]:
    """A single-item coroutine function that batches calls into ``fn(list) -> list``.

    Args:
        fn: Async function mapping a list of items to a list of results of the same length.
        max_batch_size: Most items per call of ``fn``.
        wait_timeout_s: How long the first item of a batch waits for others.
    """
    if in_serve_replica():
        from ray import serve

        return serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_timeout_s)(fn)
    return MicroBatcher(fn, max_batch_size, wait_timeout_s)


class MicroBatcher:
    """A minimal ``serve.batch`` for plain asyncio: ``await batcher(item)`` → ``fn([... item ...])[i]``.

    State is only a list of pending futures and a timer, so one instance works across event
    loops as long as a loop does not end with calls still pending.
    """

    def __init__(self, fn: BatchFn, max_batch_size: int, wait_timeout_s: float):
        self._fn, self._max, self._wait = fn, max_batch_size, wait_timeout_s
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running = False

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        if self._running:
            pass  # picked up when the running batch finishes
        elif len(self._pending) >= self._max:
            self._start()
        elif self._timer is None:
            self._timer = loop.call_later(self._wait, self._start)
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
        self._running = True
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
