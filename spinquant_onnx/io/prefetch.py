"""Compute the next tensors while the current one is written: a producer thread, bounded by bytes in flight.

numpy and BLAS release the GIL, so the producer's arithmetic runs beside the writer's ``write`` calls. At
most ``budget`` bytes of results wait at any time (one tensor always may, however large), which keeps
peak memory at about the largest tensor plus the working chunks, not the model.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np


class Prefetcher:
    """``fn(name)`` for ``names``, computed in that order on a background thread, handed out by ``__call__``.

    Asking for a name out of order computes it on the spot (it is then skipped by the producer). ``close``
    stops the producer; an exception in ``fn`` is raised by the ``__call__`` for that name.
    """

    def __init__(
        self, fn: Callable[[str], Any], names: list[str], sizes: dict[str, int], budget: int
    ) -> None:
        self.fn, self.sizes, self.budget = fn, sizes, budget
        self.pending = deque(names)
        self.done: dict[str, tuple[bool, Any]] = {}
        self.running: str | None = None
        self.held = 0  # bytes of results computed or being computed, not yet handed out
        self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._produce, name="spinquant-prefetch", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        while True:
            with self.cond:
                while not self.closed and (
                    not self.pending or (self.held and self.held + self.sizes.get(self.pending[0], 0) > self.budget)
                ):
                    self.cond.wait()
                if self.closed:
                    return
                name = self.running = self.pending.popleft()
                self.held += self.sizes.get(name, 0)
            try:
                result: tuple[bool, Any] = (True, self.fn(name))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                result = (False, exc)
            with self.cond:
                self.done[name] = result
                self.running = None
                self.cond.notify_all()

    def __call__(self, name: str) -> Any:
        with self.cond:
            if name in self.pending:  # not started: asked for out of order
                self.pending.remove(name)
                self.cond.notify_all()
                direct = True
            else:
                direct = name not in self.done and self.running != name
            if not direct:
                while name not in self.done:
                    self.cond.wait()
                ok, value = self.done.pop(name)
                self.held -= self.sizes.get(name, 0)
                self.cond.notify_all()
        if direct:
            return self.fn(name)
        if not ok:
            raise value
        return value

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.done.clear()
            self.cond.notify_all()
        self.thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def result_nbytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
