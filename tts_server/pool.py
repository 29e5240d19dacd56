"""The synthesis pool: a fixed number of worker threads (syntheses at once), jobs by need.

Every job comes with the latest time it can start and still be in time (`deadline`, on the
`time.monotonic` clock), and the pool runs the earliest first. The service sets it
(`TtsService`): for a stream's next piece, when the audio already sent will have played out,
less the piece's expected synthesis time; for a new stream's first piece, its first-audio target
less the same. So the stream about to run dry goes first, and a new stream's first piece goes
ahead of it only while the newcomer could otherwise miss its target. Each stream has at most one
piece queued. A job that has not started yet can be withdrawn (the client left, or it waited too
long to be admitted)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

class PoolClosed(Exception):
    pass


@dataclass(order=True)
class Job:
    deadline: float
    order: int
    fn: Callable[[], Any] = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)
    result: asyncio.Future[Any] = field(compare=False)
    started: asyncio.Event = field(compare=False)
    running: bool = field(default=False, compare=False)
    withdrawn: bool = field(default=False, compare=False)


class SynthesisPool:
    def __init__(self, workers: int) -> None:
        self._heap: list[Job] = []
        self._cond = threading.Condition()
        self._order = itertools.count()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"tts-{n}", daemon=True) for n in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def queued(self) -> int:
        return len(self._heap)

    def submit(self, fn: Callable[[], Any], deadline: float) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(deadline, next(self._order), fn, loop, loop.create_future(), asyncio.Event())
        with self._cond:
            if self._closed:
                raise PoolClosed()
            heapq.heappush(self._heap, job)
            self._cond.notify()
        return job

    def withdraw(self, job: Job) -> bool:
        """Withdraw a job that has not started; False if it already runs (or ran)."""
        with self._cond:
            if job.running or job.withdrawn:
                return job.withdrawn
            job.withdrawn = True
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = heapq.heappop(self._heap)
                if job.withdrawn:
                    continue
                # Under the lock, so `withdraw` sees it running or not, never in between.
                job.running = True
            job.loop.call_soon_threadsafe(job.started.set)
            try:
                value = job.fn()
            except BaseException as exc:  # delivered to the awaiting request
                job.loop.call_soon_threadsafe(_settle, job.result, None, exc)
            else:
                job.loop.call_soon_threadsafe(_settle, job.result, value, None)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
