"""Running stages side by side (a stage on a thread of its own, or a function over a stream on several
threads), and reporting their progress.

Decoding, the networks and encoding all release the GIL, so stages on different threads overlap. Both
helpers keep only a few items in flight, so memory stays bounded whatever the length of the stream; an
exception in a thread is raised again in the consumer, and a consumer that stops early stops the threads.
"""

from __future__ import annotations

import collections
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch
from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")
QUEUE_DEPTH = 1  # items waiting between two threads
Report = Callable[[str, int, "int | None"], None]  # (stage, items done, total) after each item
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def background(items: Iterable[T], depth: int = QUEUE_DEPTH) -> Iterator[T]:
    """Run the stage `items` on a thread of its own, handing its items over through a queue of `depth`."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put(item):
                    break
            else:
                put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failure(e))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := handoff.get()) is not _DONE:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


class Workers:
    """Calls run on `workers` threads with `threads` torch threads each; results taken in submission order.

    The one thread pool of the pipeline: `ordered_map` pulls a stream through it, and a stream fed a little
    at a time (`live.stream.AvatarStream`) submits to it as its batches complete. `close` (or leaving the
    `with` block) waits for the calls in flight, drops those not started, and puts the calling thread's
    torch threads back (new threads start from the last value set: the workers').
    """

    def __init__(self, workers: int, threads: int) -> None:
        self.workers = workers
        self.pending: collections.deque[Future] = collections.deque()
        self._main_threads = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="stage", initializer=torch.set_num_threads,
                                        initargs=(threads,))  # fmt: skip

    def submit(self, fn: Callable[..., R], *args: object) -> None:
        self.pending.append(self._pool.submit(fn, *args))

    @property
    def backlogged(self) -> bool:
        """More calls in flight than workers: the caller should take a result before submitting more."""
        return len(self.pending) > self.workers

    def next_ready(self, wait: bool = True) -> bool:
        """Whether the oldest call has a result to take (waiting for it with `wait`)."""
        return bool(self.pending) and (wait or self.pending[0].done())

    def take(self) -> R:
        """The oldest call's result (waiting for it); its exception is raised here."""
        return self.pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(self._main_threads)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, threads: int) -> Iterator[R]:
    """`map(fn, items)` on `workers` threads with `threads` torch threads each, results in order.

    At most workers + 1 items are in flight.
    """
    with Workers(workers, threads) as pool:
        for item in items:
            pool.submit(fn, item)
            if pool.backlogged:
                yield pool.take()
        while pool.pending:
            yield pool.take()


def progress(
    items: Iterable[T], total: int | None, stage: str, quiet: bool, report: Report | None = None,
    done_after: Callable[[T], int] | None = None,
) -> Iterator[T]:  # fmt: skip
    """`items`, counted on a progress bar (stderr, unless `quiet`) and reported as `report(stage, done, total)`
    after each; `report` may raise to cancel the run (the stages then unwind and leave no output).

    An item counts one frame, or with `done_after(item)` brings the count to that many frames: a batch
    counts when its work is done, with all its frames, so the rate (and the time left) is the work's, not
    that of reading the frames ahead of it."""
    with tqdm(total=total, desc=stage, unit="frame", disable=quiet, file=sys.stderr) as bar:
        for count, item in enumerate(items, start=1):
            yield item
            done = count if done_after is None else done_after(item)
            bar.update(done - bar.n)
            if report is not None:
                report(stage, done, total)
