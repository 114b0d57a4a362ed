"""Stop signals: noted without re-entering a log call they interrupt."""
from __future__ import annotations

import logging
import os
import signal
from types import SimpleNamespace

from processor.trainer import Trainer


def test_a_signal_inside_a_log_call_is_noted_without_logging(capfd):
    """Slurm's SIGTERM can arrive while the training loop writes a log line. The handler
    only notes it (writing straight to stderr): logging from it re-entered the file
    handler's buffered write ("RuntimeError: reentrant call", a logging traceback)."""
    trainer = SimpleNamespace(_stop_signal=None)
    reentered = []

    class SignalledDuringEmit(logging.Handler):
        busy = False

        def emit(self, record):
            if self.busy:
                reentered.append(record.getMessage())
                return
            self.busy = True
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before this returns
            finally:
                self.busy = False

    logger = logging.getLogger("comoe")
    handler = SignalledDuringEmit()
    previous = signal.signal(signal.SIGTERM, lambda s, f: Trainer._on_signal(trainer, s, f))
    logger.addHandler(handler)
    try:
        logger.warning("epoch 1 [2/9] step 2 ...")
    finally:
        logger.removeHandler(handler)
        signal.signal(signal.SIGTERM, previous)
    assert trainer._stop_signal == signal.SIGTERM
    assert reentered == []
    assert "received SIGTERM: finishing the current step" in capfd.readouterr().err
