"""Groups items of concurrent requests into model calls: up to `max_batch` items, or whatever
has arrived `max_wait_s` after the first one. Model calls run one at a time in a worker thread,
so the event loop keeps accepting (and queueing) requests meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

ScoreFn = Callable[[list[Any], list[Any]], list[Any]]
"""A scorer's `score(images, conditions) -> results`."""


@dataclass
class _Pending:
    score: ScoreFn
    image: Any
    condition: Any
    future: asyncio.Future


class Batcher:
    """One queue and one worker per scorer endpoint."""

    def __init__(self, max_batch: int, max_wait_s: float, on_batch: Callable[[int, float], None] | None = None):
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, score: ScoreFn, images: list, conditions: list) -> list:
        """Queue each (image, condition) and wait for all of their results, in order."""
        loop = asyncio.get_running_loop()
        pending = [_Pending(score, image, c, loop.create_future()) for image, c in zip(images, conditions, strict=True)]
        for entry in pending:
            self._queue.put_nowait(entry)
        return list(await asyncio.gather(*(entry.future for entry in pending)))

    async def _collect(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [entry for entry in await self._collect() if not entry.future.done()]  # skip cancelled
            started = time.monotonic()
            # Bound methods of one scorer compare (and hash) equal, though each request makes a new one.
            for score in dict.fromkeys(entry.score for entry in batch):
                group = [entry for entry in batch if entry.score == score]
                await loop.run_in_executor(self._executor, _score_group, score, group)
            if self._on_batch is not None and batch:
                self._on_batch(len(batch), time.monotonic() - started)


def _score_group(score: ScoreFn, group: list[_Pending]) -> None:
    """Score a group in one call; if that fails, item by item so one bad item fails alone."""
    try:
        results = score([e.image for e in group], [e.condition for e in group])
        outcomes: list[tuple[Any, BaseException | None]] = [(r, None) for r in results]
    except Exception:
        outcomes = []
        for entry in group:
            try:
                outcomes.append((score([entry.image], [entry.condition])[0], None))
            except Exception as error:
                outcomes.append((None, error))
    for entry, (result, error) in zip(group, outcomes, strict=True):
        entry.future.get_loop().call_soon_threadsafe(_settle, entry.future, result, error)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the request went away meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
