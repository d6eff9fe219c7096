"""Helper threads that keep reading and writing off a model's thread.

:class:`BackgroundWriter` runs jobs (open a store, append to it, close it, write a file) on one
helper thread in submission order while the caller computes; :class:`ReadAhead` reads the
next item on a helper thread while the caller works on the current one. Both re-raise a
helper's error in the caller and, after an error, drop queued work instead of running it.
The stages ``augment`` and ``estimate_normals`` and ``pipeline.features`` use them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class BackgroundWriter:
    """Jobs on one helper thread, run in the order submitted.

    ``max_pending``: with a number, :meth:`submit` waits until at most that many jobs are
    queued or running (memory stays bounded by what they hold); ``None`` never waits. A failed
    job's error is raised by the :meth:`submit` that waits for it or by :meth:`wait`, and the
    jobs after it do not run (a store is never finished after a failed append). As a context
    manager: leaving normally waits for every job; leaving with an error waits for the running
    job only and drops the queued ones.
    """

    def __init__(self, max_pending: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: deque[Future[Any]] = deque()
        self._max_pending = max_pending
        self._failed = False  # set on the helper thread; read there only

    def _run(self, job: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if self._failed:
            return None
        try:
            return job(*args)
        except BaseException:
            self._failed = True
            raise

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        self._pending.append(self._pool.submit(self._run, job, args))
        if self._max_pending is not None:
            while len(self._pending) > self._max_pending:
                self._pending.popleft().result()

    def wait(self) -> None:
        """Until every submitted job has run; re-raises the first failure."""
        while self._pending:
            self._pending.popleft().result()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self.wait()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


class ReadAhead(Generic[T]):
    """``read(0)``, ..., ``read(n - 1)`` in order, each read on a helper thread while the caller
    works on the item before it (one item ahead, so memory stays flat). A context manager:
    leaving it stops the helper and drops a read not yet started."""

    def __init__(self, read: Callable[[int], T], n: int) -> None:
        self._read = read
        self._n = n
        self._pool = ThreadPoolExecutor(max_workers=1)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[T]:
        upcoming = self._pool.submit(self._read, 0) if self._n else None
        for step in range(self._n):
            assert upcoming is not None
            item = upcoming.result()
            if step + 1 < self._n:
                upcoming = self._pool.submit(self._read, step + 1)
            yield item

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
