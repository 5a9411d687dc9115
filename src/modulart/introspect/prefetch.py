"""A bounded read-ahead pipeline: jobs run in one background thread, results are consumed in order.

The streaming weight pass reads chunk ``k + 1`` (and issues an operating-system read-ahead hint for
chunk ``k + 2``) while chunk ``k`` is reduced; torch copies and file reads release the GIL, so
reading and compute overlap on two cores. At most ``depth`` results are alive at a time, the one
the caller holds included: the caller's previous item is released when it asks for the next one,
so memory stays at ``depth`` chunks whatever the number of jobs.

An exception raised by a job (or by the job iterable itself) is re-raised in the caller, with a
note naming the job (its ``label``: the file and tensor key for a checkpoint read); the thread is
always joined: after the last job, after an error, and when the caller stops early
(:meth:`Prefetcher.close`, or leaving the ``with`` block).

Example:
    >>> with Prefetcher(Job(f"square {i}", lambda i=i: i * i) for i in range(4)) as items:
    ...     list(items)
    [0, 1, 4, 9]
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

from modulart.core.errors import ConfigError

__all__ = ["Job", "Prefetcher"]

T = TypeVar("T")


@dataclass(frozen=True)
class Job(Generic[T]):
    """One unit of background work.

    Attributes:
        label: what it reads (named in the error when it fails).
        run: produces the result (in the background thread).
        hint: optional, called in the background thread just before the *previous* job runs (e.g. an
            ``posix_fadvise(WILLNEED)`` on the bytes ``run`` will read), so the disk works ahead.
    """

    label: str
    run: Callable[[], T]
    hint: Callable[[], None] | None = None


class _End:
    pass


@dataclass(frozen=True)
class _Failure:
    error: BaseException
    label: str


_END = _End()


class Prefetcher(Generic[T]):
    """Iterate over the results of ``jobs`` (in order), computed ahead in one daemon thread.

    Args:
        jobs: the jobs, in the order the caller consumes them (iterated lazily, in the thread).
        depth: results alive at once, the caller's current one included (>= 1; 2: one read ahead).
        name: the thread's name.

    Attributes:
        started: jobs started so far (for tests and diagnostics).
    """

    def __init__(self, jobs: Iterable[Job[T]], depth: int = 2, *, name: str = "modulart-prefetch") -> None:
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ConfigError(f"depth = {depth!r}: must be an int >= 1")
        self._jobs = iter(jobs)
        self._slots = threading.Semaphore(depth)
        self._results: queue.SimpleQueue[T | _End | _Failure] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._holding = False
        self._finished = False
        self.started = 0
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    # --- the background thread ----------------------------------------------------------------
    def _produce(self) -> None:
        label = "the job list"
        try:
            nxt = next(self._jobs, None)
            while nxt is not None:
                job = nxt
                self._slots.acquire()
                if self._stop.is_set():
                    return
                label = "the job list"
                nxt = next(self._jobs, None)
                if nxt is not None and nxt.hint is not None:
                    label = nxt.label
                    nxt.hint()
                label = job.label
                self.started += 1
                result = job.run()
                del job
                self._results.put(result)
            self._results.put(_END)
        except BaseException as e:  # handed to the caller, which re-raises it
            self._results.put(_Failure(e, label))

    # --- the caller ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        if self._holding:  # the caller is done with the previous result
            self._holding = False
            self._slots.release()
        item = self._results.get()
        if isinstance(item, _End):
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            err = item.error
            note = getattr(err, "add_note", None)  # Python >= 3.11
            if note is not None:
                note(f"(raised in the background reader thread while running: {item.label})")
            raise err
        self._holding = True
        return item

    def close(self) -> None:
        """Stop the thread (after the job it is running, if any) and join it; idempotent."""
        self._finished = True
        self._stop.set()
        self._slots.release()  # wake it if it waits for a slot
        self._thread.join()
        while True:  # drop results nobody will consume
            try:
                self._results.get_nowait()
            except queue.Empty:
                break

    @property
    def alive(self) -> bool:
        """Whether the background thread is still running."""
        return self._thread.is_alive()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._finished and hasattr(self, "_thread"):
            self._stop.set()
            self._slots.release()
