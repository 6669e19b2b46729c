"""A scheduler's SIGTERM during a stage (extract-audio, embed-images): the stage stops between writes, with
its clean-up run, instead of dying on the spot with parts half-written and worker processes left to die."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Stopped(BaseException):
    """SIGTERM arrived while a stage ran. A BaseException, so that no `except Exception` of a loop that must
    survive one bad file takes it for that file's error."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While it is held, SIGTERM raises Stopped in the main thread (elsewhere nothing is installed): the part
    being written by this process is dropped, its worker processes finish the parts they hold (they ignore
    the signal: ignore_sigterm) and the parts queued for them are cancelled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_sigterm(*_) -> None:
    """Worker initializer: a scheduler signals the whole process group; the stage's main process decides
    when its workers stop, so that none dies in the middle of a part it writes or hands over."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
