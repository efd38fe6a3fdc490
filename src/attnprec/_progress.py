"""Progress within one audit case: the rows of each pass over the sequence.

The loops that take an audit's time (the bounds' row blocks, the references' row blocks,
the recurrences' chunks of tokens) call :func:`rows`; an audit names its stage
(:func:`stage`); whoever runs it may listen (:func:`listening`). Nothing is reported, and
nothing costs more than a context-variable lookup, where no one listens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["Sink", "listening", "stage", "rows"]

#: Called as ``sink(stage, done, total)``: ``done`` of ``total`` rows of the current pass.
Sink = Callable[[str, int, int], None]

_sink: ContextVar[Sink | None] = ContextVar("attnprec_progress_sink", default=None)
_stage: ContextVar[str] = ContextVar("attnprec_progress_stage", default="")
#: Seconds between two reports of one pass (its first and last rows are always reported):
#: a pass at 2^20 tokens has tens of thousands of blocks.
EVERY = 0.2
_last = [0.0]


@contextmanager
def listening(sink: Sink) -> Iterator[None]:
    """Report the passes run inside the block to ``sink``."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Name the passes run inside the block (``"reference"``, ``"bound"``, ...); its start
    is reported as ``(name, 0, 0)`` (a stage with no pass of rows, the kernel's, shows)."""
    token = _stage.set(name)
    sink = _sink.get()
    if sink is not None:
        sink(name, 0, 0)
    try:
        yield
    finally:
        _stage.reset(token)


def rows(done: int, total: int) -> None:
    """``done`` of the ``total`` rows of the current pass are through."""
    sink = _sink.get()
    if sink is None:
        return
    now = time.monotonic()
    if 0 < done < total and now - _last[0] < EVERY:
        return
    _last[0] = now
    sink(_stage.get(), int(done), int(total))
