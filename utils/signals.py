"""Stop signals and DataLoader worker processes.

Slurm, systemd and a terminal's Ctrl-C signal the whole process group, so the
DataLoader workers receive SIGTERM/SIGINT together with the training process.
PyTorch's workers die on SIGTERM, and the main process then fails with
"DataLoader worker ... is killed by signal" before it can save. Here the workers
ignore both signals (`ignore_stop_signals`, their `worker_init_fn`) and leave
the stop to the main process, which finishes its step, saves and exits; the
workers end when their loader shuts them down, or when their parent is gone.

A worker only runs its `worker_init_fn` after it has started, so the main
process creates workers inside `stop_signals_blocked()`: they inherit the
blocked signals and cannot be killed in between. The main process loses
nothing: a blocked signal is taken by another thread, or waits until the block
ends, and its Python handler runs in the main thread either way.

Work that has nothing left to save (a run's final test, after training) stops at
once instead: inside `stop_signals_raise`, a stop signal raises StopRequested.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Callable

from .errors import StopRequested

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_CAN_BLOCK = hasattr(signal, "pthread_sigmask")  # not on Windows


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Make this process ignore SIGTERM/SIGINT (and unblock them: ignored is enough)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if _CAN_BLOCK:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block SIGTERM/SIGINT in this thread (and so in processes started here)."""
    if not _CAN_BLOCK:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def stop_signals_raise(message: Callable[[int], str]):
    """SIGTERM/SIGINT raise StopRequested(message(signum), signum) in the main thread
    while inside (elsewhere than the main thread, nothing changes). Later stop signals
    are ignored while the first one's exception unwinds."""
    def stop(signum, frame):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise StopRequested(message(signum), signum)

    previous = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
