"""A scheduler's SIGTERM, or Ctrl-C, during a stage (extract-audio, embed-images): the stage stops between
writes, with its clean-up run, instead of dying on the spot with parts half-written and its worker processes
dying in the middle of theirs."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived while a stage ran. A BaseException, so that no `except Exception` of a loop that must
    survive one bad file takes it for that file's error."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While it is held, SIGTERM or SIGINT raises Stopped in the main thread (elsewhere nothing is installed):
    the part being written by this process is dropped, its worker processes finish the parts they hold (they
    ignore the signals: ignore_stop_signals) and the parts queued for them are cancelled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(*_) -> None:
    """Worker initializer: a scheduler (or Ctrl-C) signals the whole process group; the stage's main process
    decides when its workers stop, so that none dies in the middle of a part it writes or hands over."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
