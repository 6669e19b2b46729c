"""A scheduler's SIGTERM, or Ctrl-C, during a stage (extract-audio, embed-images): the stage stops between
writes, with its clean-up run, instead of dying on the spot with parts half-written and its worker processes
dying in the middle of theirs."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: list[int] = []   # the signal that asked the running stage to stop, if one did


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived while a stage ran. A BaseException, so that no `except Exception` of a loop
    that must survive one bad file takes it for that file's error."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While it is held, SIGTERM or SIGINT asks the stage to stop (main thread only; elsewhere nothing is
    installed). The handler only notes it: the stage's loops call raise_if_stopped() or stop_requested() at
    points where stopping is safe (an exception raised inside a pool's or a queue's own code could leave its
    locks held and hang the clean-up). A second signal raises Stopped at once: the way out of a stage that
    hangs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum, frame):
        if _requested:
            raise Stopped(signum)
        _requested.append(signum)

    previous = {s: signal.signal(s, note) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested.clear()


def stop_requested() -> bool:
    return bool(_requested)


def raise_if_stopped() -> None:
    """Stopped, if a signal asked the stage to stop: called between writes."""
    if _requested:
        raise Stopped(_requested[0])


def ignore_stop_signals(*_) -> None:
    """Worker initializer: a scheduler (or Ctrl-C) signals the whole process group; the stage's main process
    decides when its workers stop, so that none dies in the middle of a part it writes or hands over."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def die_with_parent() -> None:
    """Worker initializer (Linux): the kernel kills this worker when the process that started it dies (kill
    -9, the OOM killer). A process-pool worker outliving its main process would otherwise wait forever on
    its task pipe, whose write end its own inherited copy keeps open. Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        return   # best effort: a seccomp filter may forbid it
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:   # it died before the prctl
        os._exit(1)
