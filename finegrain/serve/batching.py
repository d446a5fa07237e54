"""Dynamic batching: requests that arrive together share one forward pass, off the event loop.

A model call costs much the same for one image as for a few (per-call overhead, kernels too
small to keep every core busy), so under load the server gathers the jobs waiting in a queue,
up to `max_batch` of them and waiting at most `max_wait_ms` after the first, and runs them
together in one worker thread. The event loop only awaits a future; it never runs the model.
With max_batch 1 every job runs alone (batching off), through the same thread and code.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")
_STOP = object()


class Busy(Exception):
    """The queue is full: the server answers 503 instead of letting latency grow without bound."""


@dataclass
class BatchStats:
    """What the batcher did: the batch count and mean size show whether batching happens."""

    batches: int = 0
    jobs: int = 0
    largest: int = 0

    def to_dict(self) -> dict[str, float]:
        return {"batches": self.batches, "jobs": self.jobs, "largest": self.largest,
                "mean_batch": round(self.jobs / self.batches, 3) if self.batches else 0.0}


class Batcher(Generic[Job, Result]):
    """Runs `run(jobs) -> results` (one result per job, in order) in its own thread, on batches
    gathered from concurrent `submit` calls. An exception in `run` fails that batch's jobs."""

    def __init__(self, run: Callable[[Sequence[Job]], Sequence[Result]], *, max_batch: int, max_wait_ms: float,
                 max_queue: int = 1024, name: str = "batcher") -> None:
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(f"max_batch {max_batch} must be >= 1, max_wait_ms {max_wait_ms} >= 0, "
                             f"max_queue {max_queue} >= 1")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        """A future of the job's result; raises Busy when `max_queue` jobs are already waiting."""
        future: Future = Future()
        try:
            self._queue.put_nowait((job, future))
        except queue.Full:
            raise Busy(f"{self._queue.maxsize} requests are already waiting") from None
        return future

    async def __call__(self, job: Job) -> Result:
        """The job's result, awaited without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(job))

    def close(self, timeout: float = 10.0) -> None:
        """Finish the jobs already queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _gather(self, first: tuple) -> tuple[list[tuple], bool]:
        """The first job plus whatever arrives before the batch is full or the wait is over."""
        batch, deadline = [first], time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._gather(first)
            live = [(job, future) for job, future in batch if future.set_running_or_notify_cancel()]
            if not live:
                continue
            self.stats.batches += 1
            self.stats.jobs += len(live)
            self.stats.largest = max(self.stats.largest, len(live))
            try:
                results = list(self.run([job for job, _ in live]))
                if len(results) != len(live):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(live)} jobs")
            except BaseException as error:  # noqa: BLE001 - handed to the waiting requests, never lost
                for _, future in live:
                    future.set_exception(error)
                continue
            for (_, future), result in zip(live, results):
                future.set_result(result)
